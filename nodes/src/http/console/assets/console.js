// voxgate console: follows the server-sent events of the page it is on. No dependencies.
// Everything from the server is set as text (never as HTML).
"use strict";
(function () {
  const base = document.body.dataset.base || "/console";
  // Delays from a transcript's durable append to its display here, in ms (read by tests and
  // the console benchmark).
  window.voxgateDelays = [];

  function cell(text, cls) {
    const td = document.createElement("td");
    if (cls) td.className = cls;
    td.textContent = text;
    return td;
  }

  function rowFor(c) {
    const tr = document.createElement("tr");
    tr.id = "call-" + c.sid;
    tr.dataset.call = c.sid;
    const link = document.createElement("a");
    link.href = base + "/calls/" + encodeURIComponent(c.sid);
    link.textContent = c.sid;
    const first = document.createElement("td");
    first.appendChild(link);
    tr.appendChild(first);
    tr.appendChild(cell(c.tenant));
    tr.appendChild(cell(c.from));
    tr.appendChild(cell(c.to));
    tr.appendChild(cell(c.rejected ? "rejected: " + c.rejected : c.status, "state"));
    tr.appendChild(cell(c.started.slice(0, 19).replace("T", " ")));
    const dur = cell(c.duration_secs + " s", "duration");
    tr.appendChild(dur);
    let tracks = c.tracks.length ? c.tracks.join(", ") : "—";
    // Track activity: when each party was last heard (UTC, as the server renders it).
    for (const [party, us] of [["caller", c.heard_inbound_us], ["agent", c.heard_outbound_us]]) {
      if (us) tracks += " · " + party + " heard " + new Date(us / 1000).toISOString().slice(11, 19);
    }
    tr.appendChild(cell(tracks, "tracks"));
    tr.appendChild(cell(c.severity || ""));
    return tr;
  }

  function fill(tr, c) {
    tr.className = (c.live ? "live" : "ended") + " flash";
    const d = tr.querySelector("td.duration");
    if (d) {
      d.dataset.started = String(Date.parse(c.started) * 1000);
      d.dataset.live = c.live ? "1" : "0";
      d.textContent = c.duration_secs + " s";
    }
  }

  function followList(table) {
    const body = table.tBodies[0];
    const count = document.getElementById("count");
    const es = new EventSource(base + "/events");
    es.addEventListener("call", (e) => {
      const c = JSON.parse(e.data);
      if (c.cause === "transcript") window.voxgateDelays.push(Date.now() - c.appended_us / 1000);
      let tr = document.getElementById("call-" + c.sid);
      if (!c.live) {
        if (tr) {
          tr.remove();
        }
      } else {
        const fresh = rowFor(c);
        if (tr) {
          tr.replaceWith(fresh);
        } else {
          body.insertBefore(fresh, body.firstChild);
        }
        fill(fresh, c);
        const none = document.getElementById("no-calls");
        if (none) none.remove();
      }
      if (count) count.textContent = String(body.rows.length);
    });
    es.addEventListener("resync", () => location.reload());
    setInterval(() => {
      const now = Date.now() * 1000;
      for (const d of table.querySelectorAll("td.duration[data-live='1']")) {
        const started = Number(d.dataset.started);
        if (started > 0) d.textContent = Math.max(0, Math.floor((now - started) / 1e6)) + " s";
      }
    }, 1000);
  }

  function followCall(list) {
    const call = list.dataset.call;
    const state = document.getElementById("call-state");
    const es = new EventSource(base + "/events?call=" + encodeURIComponent(call));
    function line(t, partial) {
      const li = document.createElement("li");
      li.className = "line " + t.track + (partial ? " partial" : "");
      li.dataset.track = t.track;
      li.dataset.segment = String(t.segment);
      const who = document.createElement("span");
      who.className = "party";
      who.textContent = t.party;
      const text = document.createElement("span");
      text.className = "text";
      text.textContent = t.text;
      li.appendChild(who);
      li.appendChild(document.createTextNode(" "));
      li.appendChild(text);
      return li;
    }
    function existing(t, partial) {
      const sel = "li[data-track='" + t.track + "'][data-segment='" + t.segment + "']" + (partial ? ".partial" : "");
      return list.querySelector(sel);
    }
    es.addEventListener("transcript", (e) => {
      const t = JSON.parse(e.data);
      const p = existing(t, true);
      if (t.rejected || !t.text) {
        if (p) p.remove();
        return;
      }
      const li = line(t, false);
      if (p) p.replaceWith(li); else list.appendChild(li);
      list.scrollTop = list.scrollHeight;
      window.voxgateDelays.push(Date.now() - t.appended_us / 1000);
    });
    es.addEventListener("partial", (e) => {
      const t = JSON.parse(e.data);
      if (existing(t, false)) return;
      const li = line(t, true);
      const p = existing(t, true);
      if (p) p.replaceWith(li); else list.appendChild(li);
    });
    es.addEventListener("call", (e) => {
      const c = JSON.parse(e.data);
      if (state) state.textContent = c.rejected ? "rejected: " + c.rejected : c.status;
      if (!c.live) es.close();
    });
    es.addEventListener("resync", () => location.reload());
  }

  const table = document.getElementById("calls");
  if (table && table.dataset.live === "1") followList(table);
  const conv = document.getElementById("conversation");
  if (conv && conv.dataset.live === "1") followCall(conv);
})();
