/* influence dashboard: what this browser keeps in localStorage.

   Under KEY, the audits this browser may edit, each with its edit token:
   {"current": slug | null, "audits": {slug: {slug, token, title, url, n}}}. Under TEAM_KEY, the
   server's team API key once the user gave it. Tokens only ever travel in an Authorization header
   (static/lib/http.js), never in a URL. Listeners given to onChange run after every save here and
   when another tab changes the audits. Exposed as window.influence.storage. */
(function () {
  "use strict";

  var KEY = "influence.audits";
  var TEAM_KEY = "influence.apiKey";
  var listeners = [];

  function notify() { listeners.forEach(function (fn) { fn(); }); }

  function onChange(fn) { listeners.push(fn); }

  function load() {
    try {
      var state = JSON.parse(window.localStorage.getItem(KEY) || "null");
      if (state && state.audits && typeof state.audits === "object") { return state; }
    } catch (e) { /* unreadable or blocked storage: start empty */ }
    return { current: null, audits: {} };
  }

  function save(state) {
    try { window.localStorage.setItem(KEY, JSON.stringify(state)); } catch (e) { /* blocked */ }
    notify();
  }

  /* the audit "Add to audit" adds to, or null */
  function current() {
    var state = load();
    return (state.current && state.audits[state.current]) || null;
  }

  function held(slug) { return load().audits[slug] || null; }

  function remember(entry, makeCurrent) {
    var state = load();
    state.audits[entry.slug] = entry;
    if (makeCurrent) { state.current = entry.slug; }
    save(state);
  }

  function makeCurrent(slug) {
    var state = load();
    if (!state.audits[slug]) { return; }
    state.current = slug;
    save(state);
  }

  function update(slug, fields) {
    var state = load();
    var entry = state.audits[slug];
    if (!entry) { return; }
    Object.keys(fields).forEach(function (k) { entry[k] = fields[k]; });
    save(state);
  }

  function forget(slug) {
    var state = load();
    delete state.audits[slug];
    if (state.current === slug) { state.current = Object.keys(state.audits)[0] || null; }
    save(state);
  }

  function teamKey() {
    try { return window.localStorage.getItem(TEAM_KEY) || undefined; } catch (e) { return undefined; }
  }

  function setTeamKey(key) {
    try { window.localStorage.setItem(TEAM_KEY, key); } catch (e) { /* blocked storage */ }
  }

  // another tab started, switched or forgot an audit
  window.addEventListener("storage", function (e) { if (e.key === KEY) { notify(); } });

  window.influence = window.influence || {};
  window.influence.storage = {
    load: load, onChange: onChange, current: current, held: held, remember: remember,
    makeCurrent: makeCurrent, update: update, forget: forget, teamKey: teamKey, setTeamKey: setTeamKey
  };
})();
