// difyq console: the one script of its own. Buttons with data-copy copy the named element's value.
document.addEventListener("click", (event) => {
  const button = event.target.closest("button[data-copy]");
  if (!button) return;
  const source = document.getElementById(button.dataset.copy);
  navigator.clipboard.writeText(source.value).then(() => { button.textContent = "Copied"; });
});
