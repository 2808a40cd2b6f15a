//! Word error rate: a small text normalizer and a Levenshtein alignment over words.
//!
//! # Normalization
//!
//! Both the reference and the hypothesis go through [`normalize`], in the spirit of Whisper's
//! English text normalizer but much smaller. In order:
//!
//! 1. lowercase; typographic apostrophes (`’`, `‘`) become `'`;
//! 2. a `,` between two digits is dropped (`1,000` → `1000`), a `.` between two digits is a
//!    decimal point and a `:` between two digits separates them (`9:30` → `9 30`);
//! 3. every other character that is not a letter, a digit, `'`, `$` or `%` becomes a space
//!    (so hyphens split words: `twenty-one` → `twenty one`, `555-2134` → `555 2134`); leading and
//!    trailing `'` of a word are dropped (quotes), inner ones kept (`john's`, `o'clock`);
//! 4. contractions are expanded, identically on both sides: `n't` → ` not` (`can't`, `cannot` →
//!    `can not`, `won't` → `will not`), `'m` → ` am`, `'re` → ` are`, `'ve` → ` have`, `'ll` →
//!    ` will`, `'d` → ` would`, `let's` → `let us`, and `'s` → ` is` after a pronoun or a question
//!    word (`it's`, `that's`, `what's`, `there's`, …); any other `'s` is a possessive and stays;
//! 5. numbers become words: `0`–`99` as words (`21` → `twenty one`), a number of three or more
//!    digits, or with a leading zero, digit by digit (`94107` → `nine four one zero seven`: phone,
//!    account and zip numbers are read that way; years and hundreds are *not* handled, so the
//!    corpus avoids them), ordinals `1st`–`99th` as ordinal words (`21st` → `twenty first`),
//!    `H.MM` (one or two digits, a point, exactly two digits) like `H:MM`, as a time or price is
//!    said (`9.30` → `nine thirty`, Whisper's way of writing "nine thirty"), other decimals as
//!    `X point D D…` (`2.5` → `two point five`), a leading `$` → `… dollars` after the number, a
//!    trailing `%` → `… percent`; a letter/digit boundary inside a word splits it (`3pm` → `three pm`);
//! 6. a few spellings are unified (`ok` → `okay`, `alright` → `all right`) and hesitations are
//!    dropped (`uh`, `um`, `umm`, `hmm`, `mm`, `mhm`, `er`, `erm`);
//! 7. the result is split on whitespace.
//!
//! British/American spelling is not unified: the corpus avoids words that differ.
//!
//! # Rate
//!
//! [`wer`] aligns the two word sequences with unit costs (substitution, deletion, insertion) and
//! counts each kind on one minimum-cost alignment (ties prefer a match/substitution, then a
//! deletion, then an insertion). The rate is `(subs + dels + ins) / ref_words`; sums over many
//! sentences ([`WerCounts`] adds, [`WerByVoice`] groups by voice) give the corpus WER, which
//! weights sentences by their length.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::ops::{Add, AddAssign};

const ONES: [&str; 20] = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
];
const TENS: [&str; 10] = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"];
const ORD_ONES: [&str; 20] = [
    "zeroth",
    "first",
    "second",
    "third",
    "fourth",
    "fifth",
    "sixth",
    "seventh",
    "eighth",
    "ninth",
    "tenth",
    "eleventh",
    "twelfth",
    "thirteenth",
    "fourteenth",
    "fifteenth",
    "sixteenth",
    "seventeenth",
    "eighteenth",
    "nineteenth",
];
const ORD_TENS: [&str; 10] =
    ["", "", "twentieth", "thirtieth", "fortieth", "fiftieth", "sixtieth", "seventieth", "eightieth", "ninetieth"];

const FILLERS: &[&str] = &["uh", "um", "umm", "hmm", "mm", "mhm", "er", "erm"];

/// Words before which `'s` means `is`.
const S_IS: &[&str] =
    &["it", "that", "what", "there", "here", "he", "she", "where", "who", "how", "this", "when", "why"];

/// `n` (0..=99) as words.
fn cardinal(n: u32, out: &mut Vec<String>) {
    debug_assert!(n < 100);
    let n = n as usize;
    if n < 20 {
        out.push(ONES[n].into());
    } else {
        out.push(TENS[n / 10].into());
        if !n.is_multiple_of(10) {
            out.push(ONES[n % 10].into());
        }
    }
}

/// `n` (1..=99) as ordinal words.
fn ordinal(n: u32, out: &mut Vec<String>) {
    debug_assert!(n < 100);
    let n = n as usize;
    if n < 20 {
        out.push(ORD_ONES[n].into());
    } else if n.is_multiple_of(10) {
        out.push(ORD_TENS[n / 10].into());
    } else {
        out.push(TENS[n / 10].into());
        out.push(ORD_ONES[n % 10].into());
    }
}

/// A string of ASCII digits as words: 0–99 as a number, otherwise digit by digit.
fn digits(d: &str, out: &mut Vec<String>) {
    if d.len() <= 2 && !(d.len() == 2 && d.starts_with('0')) {
        cardinal(d.parse().expect("ascii digits"), out);
    } else {
        for c in d.bytes() {
            out.push(ONES[usize::from(c - b'0')].into());
        }
    }
}

/// Step 2 and 3: a string of words made of letters, digits, `'`, `$`, `%` and `.` (decimal).
fn clean(text: &str) -> String {
    let chars: Vec<char> =
        text.chars().flat_map(char::to_lowercase).map(|c| if c == '’' || c == '‘' { '\'' } else { c }).collect();
    let digit_at = |i: usize| chars.get(i).is_some_and(char::is_ascii_digit);
    let mut s = String::with_capacity(chars.len());
    for (i, &c) in chars.iter().enumerate() {
        let between_digits = i > 0 && digit_at(i - 1) && digit_at(i + 1);
        match c {
            ',' if between_digits => {}
            '.' if between_digits => s.push('.'),
            c if c.is_alphanumeric() || c == '\'' || c == '$' || c == '%' => s.push(c),
            _ => s.push(' '),
        }
    }
    s
}

/// Step 4: expands a contraction into `out`; false if `w` is not one.
fn expand_contraction(w: &str, out: &mut Vec<String>) -> bool {
    let mut push = |a: &str, b: &str| {
        out.push(a.to_owned());
        out.push(b.to_owned());
        true
    };
    match w {
        "can't" | "cannot" => return push("can", "not"),
        "won't" => return push("will", "not"),
        "shan't" => return push("shall", "not"),
        "ain't" => return push("is", "not"),
        "let's" => return push("let", "us"),
        _ => {}
    }
    for (suffix, word) in
        [("n't", "not"), ("'m", "am"), ("'re", "are"), ("'ve", "have"), ("'ll", "will"), ("'d", "would")]
    {
        if let Some(stem) = w.strip_suffix(suffix) {
            if !stem.is_empty() {
                return push(stem, word);
            }
        }
    }
    if let Some(stem) = w.strip_suffix("'s") {
        if S_IS.contains(&stem) {
            return push(stem, "is");
        }
    }
    false
}

/// Step 5: a word with digits, `$`, `%` or `.` in it.
fn numeric(w: &str, out: &mut Vec<String>) {
    let (w, dollars) = match w.strip_prefix('$') {
        Some(rest) => (rest, true),
        None => (w, false),
    };
    let (w, percent) = match w.strip_suffix('%') {
        Some(rest) => (rest, true),
        None => (w, false),
    };
    // Leftover symbols are punctuation.
    let w = w.trim_matches(|c| c == '$' || c == '%' || c == '.');
    let w: String = w.chars().filter(|&c| c != '$' && c != '%').collect();
    let mut pieces = Vec::new();
    // Split at letter/digit boundaries, keeping ordinal suffixes on their number.
    let mut rest = w.as_str();
    while !rest.is_empty() {
        let is_num = |c: char| c.is_ascii_digit() || c == '.';
        let first_num = rest.starts_with(is_num);
        let end = rest.find(|c: char| is_num(c) != first_num).unwrap_or(rest.len());
        let (mut head, mut tail) = rest.split_at(end);
        if first_num {
            for suf in ["st", "nd", "rd", "th"] {
                if tail.starts_with(suf)
                    && !tail[2..].starts_with(|c: char| c.is_alphabetic())
                    && head.bytes().all(|b| b.is_ascii_digit())
                {
                    let n: u32 = head.parse().unwrap_or(0);
                    if (1..100).contains(&n) && !(head.len() == 2 && head.starts_with('0')) {
                        head = &rest[..end + 2];
                        tail = &rest[end + 2..];
                    }
                    break;
                }
            }
        }
        pieces.push((head, first_num));
        rest = tail;
    }
    for (piece, num) in pieces {
        if !num {
            if !piece.is_empty() {
                out.push(piece.to_owned());
            }
        } else if piece.ends_with(|c: char| c.is_alphabetic()) {
            ordinal(piece[..piece.len() - 2].parse().expect("checked"), out);
        } else {
            let parts: Vec<&str> = piece.split('.').filter(|p| !p.is_empty()).collect();
            if let [hour, minutes] = parts[..] {
                if hour.len() <= 2 && minutes.len() == 2 {
                    // A time or a price written with a point: "9.30" is said "nine thirty".
                    digits(hour, out);
                    digits(minutes, out);
                    continue;
                }
            }
            let mut parts = parts.into_iter();
            if let Some(int) = parts.next() {
                digits(int, out);
            }
            for frac in parts {
                out.push("point".into());
                for c in frac.bytes() {
                    out.push(ONES[usize::from(c - b'0')].into());
                }
            }
        }
    }
    if dollars {
        out.push("dollars".into());
    }
    if percent {
        out.push("percent".into());
    }
}

/// Normalizes `text` into words (see the module docs for the rules).
pub fn normalize(text: &str) -> Vec<String> {
    let cleaned = clean(text);
    let mut out = Vec::new();
    for raw in cleaned.split_whitespace() {
        let w = raw.trim_matches('\'');
        if w.is_empty() || w.chars().all(|c| c == '.' || c == '$' || c == '%') {
            continue;
        }
        if w.contains(|c: char| c.is_ascii_digit() || c == '$' || c == '%') {
            numeric(w, &mut out);
            continue;
        }
        if expand_contraction(w, &mut out) {
            continue;
        }
        match w {
            "ok" => out.push("okay".into()),
            "alright" => {
                out.push("all".into());
                out.push("right".into());
            }
            f if FILLERS.contains(&f) => {}
            _ => out.push(w.to_owned()),
        }
    }
    out
}

/// Error counts of one or more hypotheses against their references.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WerCounts {
    /// Reference words replaced by another word.
    pub subs: usize,
    /// Reference words missing from the hypothesis.
    pub dels: usize,
    /// Hypothesis words with no reference word.
    pub ins: usize,
    /// Words in the (normalized) reference.
    pub ref_words: usize,
}

impl WerCounts {
    /// `subs + dels + ins`.
    pub fn errors(&self) -> usize {
        self.subs + self.dels + self.ins
    }

    /// `errors / ref_words`; an empty reference counts as one word (so any insertion is ≥ 100%).
    pub fn rate(&self) -> f64 {
        self.errors() as f64 / self.ref_words.max(1) as f64
    }
}

impl Add for WerCounts {
    type Output = WerCounts;
    fn add(self, o: WerCounts) -> WerCounts {
        WerCounts {
            subs: self.subs + o.subs,
            dels: self.dels + o.dels,
            ins: self.ins + o.ins,
            ref_words: self.ref_words + o.ref_words,
        }
    }
}

impl AddAssign for WerCounts {
    fn add_assign(&mut self, o: WerCounts) {
        *self = *self + o;
    }
}

impl std::iter::Sum for WerCounts {
    fn sum<I: Iterator<Item = WerCounts>>(iter: I) -> WerCounts {
        iter.fold(WerCounts::default(), Add::add)
    }
}

/// One step of an alignment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Edit {
    Match(String),
    /// (reference word, hypothesis word)
    Sub(String, String),
    /// A reference word the hypothesis lacks.
    Del(String),
    /// A hypothesis word the reference lacks.
    Ins(String),
}

/// A minimum-cost alignment of two word sequences, in order.
pub fn align(reference: &[String], hypothesis: &[String]) -> Vec<Edit> {
    let (n, m) = (reference.len(), hypothesis.len());
    // d[i][j]: distance between reference[..i] and hypothesis[..j].
    let w = m + 1;
    let mut d = vec![0usize; (n + 1) * w];
    for i in 0..=n {
        d[i * w] = i;
    }
    for (j, cell) in d.iter_mut().enumerate().take(m + 1) {
        *cell = j;
    }
    for i in 1..=n {
        for j in 1..=m {
            let diag = d[(i - 1) * w + j - 1] + usize::from(reference[i - 1] != hypothesis[j - 1]);
            let del = d[(i - 1) * w + j] + 1;
            let ins = d[i * w + j - 1] + 1;
            d[i * w + j] = diag.min(del).min(ins);
        }
    }
    let mut edits = Vec::with_capacity(n.max(m));
    let (mut i, mut j) = (n, m);
    while i > 0 || j > 0 {
        let here = d[i * w + j];
        if i > 0 && j > 0 {
            let same = reference[i - 1] == hypothesis[j - 1];
            if here == d[(i - 1) * w + j - 1] + usize::from(!same) {
                edits.push(if same {
                    Edit::Match(reference[i - 1].clone())
                } else {
                    Edit::Sub(reference[i - 1].clone(), hypothesis[j - 1].clone())
                });
                i -= 1;
                j -= 1;
                continue;
            }
        }
        if i > 0 && here == d[(i - 1) * w + j] + 1 {
            edits.push(Edit::Del(reference[i - 1].clone()));
            i -= 1;
        } else {
            edits.push(Edit::Ins(hypothesis[j - 1].clone()));
            j -= 1;
        }
    }
    edits.reverse();
    edits
}

/// Counts the edits of an alignment.
pub fn count(edits: &[Edit]) -> WerCounts {
    let mut c = WerCounts::default();
    for e in edits {
        match e {
            Edit::Match(_) => c.ref_words += 1,
            Edit::Sub(..) => {
                c.subs += 1;
                c.ref_words += 1;
            }
            Edit::Del(_) => {
                c.dels += 1;
                c.ref_words += 1;
            }
            Edit::Ins(_) => c.ins += 1,
        }
    }
    c
}

/// Word errors of `hypothesis` against `reference`, both [`normalize`]d.
pub fn wer(reference: &str, hypothesis: &str) -> WerCounts {
    count(&align(&normalize(reference), &normalize(hypothesis)))
}

/// Whether a normalized word is a number word (`zero` … `ninety`, as [`normalize`] writes
/// numbers): digits of account, phone and zip numbers, amounts, times.
pub fn is_number_word(w: &str) -> bool {
    !w.is_empty() && (ONES.contains(&w) || TENS.contains(&w))
}

/// The errors on number words alone: of the reference's number words, those substituted or
/// deleted, and number words inserted (or put in place of another word); `ref_words` counts the
/// reference's number words. Phone calls carry account numbers, amounts and dates, so these are
/// reported apart from the overall WER.
pub fn number_errors(edits: &[Edit]) -> WerCounts {
    let mut c = WerCounts::default();
    for e in edits {
        match e {
            Edit::Match(r) => c.ref_words += usize::from(is_number_word(r)),
            Edit::Sub(r, _) if is_number_word(r) => {
                c.subs += 1;
                c.ref_words += 1;
            }
            Edit::Sub(_, h) | Edit::Ins(h) => c.ins += usize::from(is_number_word(h)),
            Edit::Del(r) if is_number_word(r) => {
                c.dels += 1;
                c.ref_words += 1;
            }
            Edit::Del(_) => {}
        }
    }
    c
}

/// The alignment as one line: matches as words, errors as `[ref→hyp]`, `[-ref]`, `[+hyp]`.
pub fn diff(reference: &str, hypothesis: &str) -> String {
    let edits = align(&normalize(reference), &normalize(hypothesis));
    let mut s = String::new();
    for (k, e) in edits.iter().enumerate() {
        if k > 0 {
            s.push(' ');
        }
        let _ = match e {
            Edit::Match(w) => write!(s, "{w}"),
            Edit::Sub(r, h) => write!(s, "[{r}→{h}]"),
            Edit::Del(r) => write!(s, "[-{r}]"),
            Edit::Ins(h) => write!(s, "[+{h}]"),
        };
    }
    s
}

/// Totals of one voice (or any group).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GroupTotals {
    pub counts: WerCounts,
    /// The same on number words alone ([`number_errors`]).
    pub numbers: WerCounts,
    /// Sentences added.
    pub sentences: usize,
    /// Of those, transcribed without any error.
    pub exact: usize,
}

impl GroupTotals {
    pub fn add(&mut self, c: WerCounts) {
        self.counts += c;
        self.sentences += 1;
        self.exact += usize::from(c.errors() == 0);
    }
}

/// WER summed per voice (or any other label), in label order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WerByVoice {
    pub groups: BTreeMap<String, GroupTotals>,
}

impl WerByVoice {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one sentence's counts under `voice`.
    pub fn add(&mut self, voice: &str, c: WerCounts) {
        self.groups.entry(voice.to_owned()).or_default().add(c);
    }

    /// Scores `hypothesis` against `reference` and adds it under `voice`; returns its counts.
    pub fn score(&mut self, voice: &str, reference: &str, hypothesis: &str) -> WerCounts {
        let edits = align(&normalize(reference), &normalize(hypothesis));
        let c = count(&edits);
        self.add(voice, c);
        if let Some(g) = self.groups.get_mut(voice) {
            g.numbers += number_errors(&edits);
        }
        c
    }

    pub fn get(&self, voice: &str) -> Option<&GroupTotals> {
        self.groups.get(voice)
    }

    /// All voices together.
    pub fn total(&self) -> GroupTotals {
        self.groups.values().fold(GroupTotals::default(), |mut t, g| {
            t.counts += g.counts;
            t.numbers += g.numbers;
            t.sentences += g.sentences;
            t.exact += g.exact;
            t
        })
    }

    /// A Markdown table: voice, sentences, exact, words, S, D, I, WER, the number words and
    /// their error rate; then the total.
    pub fn table(&self) -> String {
        let mut s = String::from(
            "| voice | sentences | exact | ref words | subs | dels | ins | WER | number words | number WER |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        );
        let total = self.total();
        for (name, g) in self.groups.iter().map(|(k, v)| (k.as_str(), v)).chain(std::iter::once(("all", &total))) {
            let c = g.counts;
            let _ = writeln!(
                s,
                "| {name} | {} | {} | {} | {} | {} | {} | {:.1}% | {} | {:.1}% |",
                g.sentences,
                g.exact,
                c.ref_words,
                c.subs,
                c.dels,
                c.ins,
                100.0 * c.rate(),
                g.numbers.ref_words,
                100.0 * g.numbers.rate()
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> String {
        normalize(s).join(" ")
    }

    fn words(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn lowercase_and_punctuation() {
        assert_eq!(n("Hello, World!  How are   you?"), "hello world how are you");
        assert_eq!(n("\"Yes,\" she said... 'fine'."), "yes she said fine");
        assert_eq!(n("John’s car; the driver's seat"), "john's car the driver's seat");
        assert_eq!(n("  \t\n"), "");
        assert_eq!(n("well-known e.g."), "well known e g");
    }

    #[test]
    fn contractions_expand_the_same_on_both_sides() {
        assert_eq!(n("I can't"), "i can not");
        assert_eq!(n("I cannot"), "i can not");
        assert_eq!(n("I can not"), "i can not");
        assert_eq!(n("We won't, they don't, it isn't"), "we will not they do not it is not");
        assert_eq!(n("I'm sure you're right, we've met"), "i am sure you are right we have met");
        assert_eq!(n("I'll wait; I'd like that"), "i will wait i would like that");
        assert_eq!(n("It's fine, that's it, what’s up"), "it is fine that is it what is up");
        assert_eq!(n("Let's go"), "let us go");
        assert_eq!(n("at three o'clock"), "at three o'clock");
        assert_eq!(wer("I do not know", "I don't know").errors(), 0);
    }

    #[test]
    fn numbers_become_words() {
        assert_eq!(n("5"), "five");
        assert_eq!(n("0 and 10"), "zero and ten");
        assert_eq!(n("21"), "twenty one");
        assert_eq!(n("twenty-one"), "twenty one");
        assert_eq!(n("40 or 99"), "forty or ninety nine");
        assert_eq!(n("19"), "nineteen");
        // Three or more digits, or a leading zero: digit by digit.
        assert_eq!(n("94107"), "nine four one zero seven");
        assert_eq!(n("555-2134"), "five five five two one three four");
        assert_eq!(n("07"), "zero seven");
        assert_eq!(n("1,000"), "one zero zero zero");
        // Times, ordinals, money, percent, decimals, glued units.
        assert_eq!(n("at 9:30"), "at nine thirty");
        assert_eq!(n("the 3rd, 21st and 30th"), "the third twenty first and thirtieth");
        assert_eq!(n("the 1st of June"), "the first of june");
        assert_eq!(n("$45."), "forty five dollars");
        assert_eq!(n("50%"), "fifty percent");
        assert_eq!(n("2.5"), "two point five");
        assert_eq!(n("4.7291"), "four point seven two nine one");
        assert_eq!(n("at 9.30."), "at nine thirty");
        assert_eq!(n("10.05"), "ten zero five");
        assert_eq!(n("123.45"), "one two three point four five");
        assert_eq!(n("3pm"), "three pm");
        assert_eq!(n("4th floor, room 12B"), "fourth floor room twelve b");
    }

    #[test]
    fn spellings_and_fillers() {
        assert_eq!(n("OK, uh, alright um"), "okay all right");
        assert_eq!(n("Okay."), "okay");
    }

    #[test]
    fn identical_texts_have_no_errors() {
        let c = wer("Hello, I'd like to order 2 pizzas.", "hello i would like to order two pizzas");
        assert_eq!(c, WerCounts { subs: 0, dels: 0, ins: 0, ref_words: 8 });
        assert_eq!(c.rate(), 0.0);
    }

    #[test]
    fn hand_computed_counts() {
        // One substitution in four words.
        let c = wer("the cat sat down", "the bat sat down");
        assert_eq!((c.subs, c.dels, c.ins, c.ref_words), (1, 0, 0, 4));
        assert_eq!(c.rate(), 0.25);
        // One deletion.
        let c = wer("the cat sat down", "the cat down");
        assert_eq!((c.subs, c.dels, c.ins, c.ref_words), (0, 1, 0, 4));
        // One insertion.
        let c = wer("the cat sat down", "the cat sat right down");
        assert_eq!((c.subs, c.dels, c.ins, c.ref_words), (0, 0, 1, 4));
        // Empty hypothesis: all deleted.
        let c = wer("a b c", "");
        assert_eq!((c.subs, c.dels, c.ins, c.ref_words), (0, 3, 0, 3));
        assert_eq!(c.rate(), 1.0);
        // Empty reference: all inserted, rate over one word.
        let c = wer("", "a b");
        assert_eq!((c.subs, c.dels, c.ins, c.ref_words), (0, 0, 2, 0));
        assert_eq!(c.rate(), 2.0);
        assert_eq!(wer("", "").rate(), 0.0);
        // Mixed: "my order number is four seven two" vs "my older number four seven two one"
        // older/order = S, "is" = D, "one" = I → 3 errors / 7 words.
        let c = wer("My order number is four seven two.", "My older number 472 1");
        assert_eq!((c.subs, c.dels, c.ins, c.ref_words), (1, 1, 1, 7));
        assert!((c.rate() - 3.0 / 7.0).abs() < 1e-12);
        // More errors than words: WER above 100%.
        let c = wer("yes", "no no no");
        assert_eq!((c.subs, c.dels, c.ins, c.ref_words), (1, 0, 2, 1));
        assert_eq!(c.rate(), 3.0);
    }

    #[test]
    fn alignment_shows_the_edits() {
        let e = align(&words("a b c d"), &words("a x c d e"));
        assert_eq!(
            e,
            vec![
                Edit::Match("a".into()),
                Edit::Sub("b".into(), "x".into()),
                Edit::Match("c".into()),
                Edit::Match("d".into()),
                Edit::Ins("e".into()),
            ]
        );
        assert_eq!(diff("a b c d", "a c d e"), "a [-b] c d [+e]");
        // The distance is symmetric in total errors.
        let (r, h) = (words("one two three four five"), words("two three six four"));
        assert_eq!(count(&align(&r, &h)).errors(), 3);
        assert_eq!(count(&align(&h, &r)).errors(), 3);
    }

    #[test]
    fn aggregates_sum_per_voice() {
        let mut t = WerByVoice::new();
        t.score("flite:slt", "the cat sat down", "the cat sat down");
        t.score("flite:slt", "yes please", "yes");
        t.score("espeak-ng:en-us", "a b c d", "a x c d e");
        let slt = t.get("flite:slt").unwrap();
        assert_eq!(slt.sentences, 2);
        assert_eq!(slt.exact, 1);
        assert_eq!(slt.counts.ref_words, 6);
        assert_eq!(slt.counts.dels, 1);
        assert!((slt.counts.rate() - 1.0 / 6.0).abs() < 1e-12);
        let all = t.total();
        assert_eq!(all.sentences, 3);
        assert_eq!(all.counts, WerCounts { subs: 1, dels: 1, ins: 1, ref_words: 10 });
        assert!((all.counts.rate() - 0.3).abs() < 1e-12);
        let sum: WerCounts = t.groups.values().map(|g| g.counts).sum();
        assert_eq!(sum, all.counts);
        let table = t.table();
        assert!(table.contains("| flite:slt | 2 | 1 | 6 | 0 | 1 | 0 | 16.7% | 0 | 0.0% |"), "{table}");
        assert!(table.contains("| all | 3 | 1 | 10 | 1 | 1 | 1 | 30.0% | 0 | 0.0% |"), "{table}");
    }

    #[test]
    fn number_words_are_counted_apart() {
        let e = |r: &str, h: &str| number_errors(&align(&normalize(r), &normalize(h)));
        // "four seven two nine one": one digit wrong, one lost; "is" is not a number word.
        assert_eq!(
            e("My order number is 47291.", "My order number is four seven three nine."),
            WerCounts { subs: 1, dels: 1, ins: 0, ref_words: 5 }
        );
        // A digit string merged into a two-digit number: "five five" read as "fifty five".
        assert_eq!(e("five five", "fifty five"), WerCounts { subs: 1, dels: 0, ins: 0, ref_words: 2 });
        // A number where the reference has a word counts as inserted; word errors do not count.
        assert_eq!(e("for you", "four you"), WerCounts { subs: 0, dels: 0, ins: 1, ref_words: 0 });
        assert_eq!(e("the cat", "a dog"), WerCounts::default());
        let mut t = WerByVoice::new();
        t.score("v", "zip nine four one zero seven", "zip nine four one zero seven");
        t.score("v", "forty five dollars", "forty dollars");
        assert_eq!(t.total().numbers, WerCounts { subs: 0, dels: 1, ins: 0, ref_words: 7 });
        assert!(t.table().contains("| all | 2 | 1 | 9 | 0 | 1 | 0 | 11.1% | 7 | 14.3% |"), "{}", t.table());
    }
}
