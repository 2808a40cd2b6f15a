//! Spoken digit strings written as digits: account, order, phone and ZIP numbers read out digit by
//! digit ("four seven two nine one") come back from Whisper sometimes as digits, sometimes as
//! words; with [`super::decode::DecodeOptions::digit_strings`] a run of three or more spoken
//! digits is written as digits (`47291`), so an app parses them the same way every time.
//!
//! Only whole runs of single digits are joined (`zero`/`oh` to `nine`, any case, joined across
//! spaces and hyphens, not across other punctuation); counts and amounts ("twenty minutes",
//! "forty five dollars"), and runs of one or two digits ("table for four", "two one") are left as
//! they are. `oh` counts as zero only inside a run that has other digits.

/// The digit a word says, if it says one (`"Seven,"` → 7: surrounding punctuation ignored).
fn digit_of(word: &str) -> Option<char> {
    let core = word.trim_matches(|c: char| !c.is_alphanumeric());
    let lower = core.to_ascii_lowercase();
    let d = match lower.as_str() {
        "zero" | "oh" => '0',
        "one" => '1',
        "two" => '2',
        "three" => '3',
        "four" => '4',
        "five" => '5',
        "six" => '6',
        "seven" => '7',
        "eight" => '8',
        "nine" => '9',
        _ => return None,
    };
    Some(d)
}

/// Whether the run may go on after `word`: no punctuation after the word itself.
fn continues(word: &str) -> bool {
    !word.ends_with(|c: char| !c.is_alphanumeric())
}

/// Writes runs of three or more spoken digits in `text` as digits (see the module docs); other
/// text, spacing and the punctuation around a run are kept.
pub fn join_digit_runs(text: &str) -> String {
    // Words with their leading whitespace, so spacing survives; hyphenated runs are split first.
    let words: Vec<&str> = text.split_inclusive(|c: char| c.is_whitespace() || c == '-').collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < words.len() {
        // The longest run starting at i.
        let mut j = i;
        while j < words.len() {
            let w = words[j].trim_end_matches(|c: char| c.is_whitespace() || c == '-');
            if digit_of(w).is_none() || w.trim_start_matches(|c: char| !c.is_alphanumeric()) != w.trim_start() {
                // Opening punctuation only on the first word of a run.
                if !(j == i && digit_of(w).is_some()) {
                    break;
                }
            }
            j += 1;
            if !continues(w) {
                break;
            }
        }
        let run = &words[i..j];
        let digits: String =
            run.iter().filter_map(|w| digit_of(w.trim_end_matches(|c: char| c.is_whitespace() || c == '-'))).collect();
        let only_oh = run.iter().all(|w| {
            let core = w.trim_matches(|c: char| !c.is_alphanumeric());
            core.eq_ignore_ascii_case("oh")
        });
        if run.len() >= 3 && !only_oh {
            let first = run[0];
            let last = run[run.len() - 1];
            let lead: String = first.chars().take_while(|c| !c.is_alphanumeric()).collect();
            let last_core_end = last.rfind(|c: char| c.is_alphanumeric()).map_or(last.len(), |p| p + 1);
            out.push_str(&lead);
            out.push_str(&digits);
            out.push_str(&last[last_core_end..]);
            i = j;
        } else {
            out.push_str(words[i]);
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_of_spoken_digits_become_digits() {
        for (said, written) in [
            ("My order number is four seven two nine one.", "My order number is 47291."),
            ("My zip code is nine four one zero seven.", "My zip code is 94107."),
            ("It's five five five, two one three four.", "It's 555, 2134."),
            ("Call me on oh two oh, seven nine four six.", "Call me on 020, 7946."),
            ("Four-seven-two, please", "472, please"),
            ("Account \"one two three\" is closed", "Account \"123\" is closed"),
            ("The PIN is Nine Nine Nine Nine", "The PIN is 9999"),
        ] {
            assert_eq!(join_digit_runs(said), written, "{said:?}");
        }
    }

    #[test]
    fn counts_amounts_and_short_runs_stay_words() {
        for said in [
            "I have been waiting on hold for twenty minutes.",
            "The total came to forty five dollars.",
            "We need a table for four people at seven tonight.",
            "The doctor can see you on Wednesday at nine thirty.",
            "Two one.",
            "Oh, oh, oh no.",
            "Someone phoned.",
            "",
            "  spaced   out  ",
        ] {
            assert_eq!(join_digit_runs(said), said);
        }
    }

    #[test]
    fn any_text_keeps_its_words_and_never_panics() {
        for s in [
            "one two three four five six seven eight nine zero",
            "ünï one two thrée",
            "one\ttwo\nthree",
            "--one--two--three--",
            "nine,",
            "oh oh oh",
        ] {
            let out = join_digit_runs(s);
            // Nothing but digit words changes: the letters that are not digit words survive.
            let kept = |t: &str| {
                t.split(|c: char| !c.is_alphabetic()).filter(|w| !w.is_empty() && digit_of(w).is_none()).count()
            };
            assert_eq!(kept(&out), kept(s), "{s:?} → {out:?}");
        }
        assert_eq!(join_digit_runs("one two three four five six seven eight nine zero"), "1234567890");
    }
}
