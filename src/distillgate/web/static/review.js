// Keyboard shortcuts for the review pages. Keys never fire while typing in a field.
//   overview: 1-9 open a queue.   row: a accept, c correct (label picker or JSON editor), r reject, s skip,
//   o overview, Escape leaves a field; in the JSON editor Ctrl+Enter saves.
// The JSON editor says live whether its text parses; the server still checks it (and the schema) on save.
"use strict";
(function () {
  function typing(el) {
    if (!el) { return false; }
    var tag = el.tagName;
    return tag === "INPUT" || tag === "SELECT" || tag === "TEXTAREA" || el.isContentEditable;
  }
  function submit(id) {
    var form = document.getElementById(id);
    if (form) { form.requestSubmit(); return true; }
    return false;
  }
  function focus(id) {
    var el = document.getElementById(id);
    if (el) { el.focus(); return true; }
    return false;
  }
  document.addEventListener("keydown", function (ev) {
    if (ev.ctrlKey || ev.metaKey || ev.altKey) { return; }
    if (ev.key === "Escape" && typing(document.activeElement)) { document.activeElement.blur(); return; }
    if (typing(ev.target)) { return; }
    var done = false;
    switch (ev.key) {
      case "a": done = submit("accept-form"); break;
      case "c": done = focus("label") || focus("answer-json"); break;
      case "r": done = focus("reject-reason"); break;
      case "s": done = submit("skip-form"); break;
      case "o": window.location.assign("/"); done = true; break;
      default:
        if (/^[1-9]$/.test(ev.key)) {
          var link = document.querySelector('a[data-key="' + ev.key + '"]');
          if (link) { link.click(); done = true; }
        }
    }
    if (done) { ev.preventDefault(); }
  });

  var editor = document.getElementById("answer-json");
  if (editor) {
    var hint = document.getElementById("answer-json-check");
    var check = function () {
      try {
        JSON.parse(editor.value);
        hint.textContent = "";
        if (!document.getElementById("answer-json-error")) { editor.removeAttribute("aria-invalid"); }
      } catch (err) {
        hint.textContent = "Not valid JSON yet: " + err.message;
        editor.setAttribute("aria-invalid", "true");
      }
    };
    editor.addEventListener("input", check);
    editor.addEventListener("keydown", function (ev) {
      if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) { ev.preventDefault(); editor.form.requestSubmit(); }
    });
    check();
  }
})();
