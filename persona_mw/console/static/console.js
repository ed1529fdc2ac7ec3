// Confirmation before destructive or revealing actions: any form or link with data-confirm.
document.addEventListener("submit", function (ev) {
  var msg = ev.target.getAttribute("data-confirm");
  if (msg && !window.confirm(msg)) { ev.preventDefault(); }
});
document.addEventListener("click", function (ev) {
  var a = ev.target.closest ? ev.target.closest("a[data-confirm]") : null;
  if (a && !window.confirm(a.getAttribute("data-confirm"))) { ev.preventDefault(); }
});
