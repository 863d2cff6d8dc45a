// The dashboard: its live part is static/live.js polling /dashboard.html; this adds the
// screenshot dialog (a runner's latest screen, or a fresh one taken on request).
"use strict";

(() => {
  const { clock } = window.startLivePage({
    fragment: "/dashboard.html", who: "monitor", busy: "is starting or busy",
  });

  const live = document.getElementById("live");
  const dialog = document.getElementById("screenshot");
  const dialogImage = document.getElementById("screenshot-image");
  const dialogTitle = document.getElementById("screenshot-title");
  const dialogStatus = document.getElementById("screenshot-status");
  const dialogOpen = document.getElementById("screenshot-open");
  const nowButton = document.getElementById("screenshot-now");

  let shownRunner = null;
  let freshUrl = null;

  // Screenshots ----------------------------------------------------------------------------

  function setImage(url) {
    if (freshUrl) URL.revokeObjectURL(freshUrl);
    freshUrl = url.startsWith("blob:") ? url : null;
    if (url) dialogImage.src = url;
    else dialogImage.removeAttribute("src"); // src="" would fetch the page itself
  }

  function openScreenshot(button) {
    shownRunner = button.dataset.runnerId;
    const version = button.dataset.version || Date.now();
    const url = `/runner/${encodeURIComponent(shownRunner)}/screenshot.png?v=${encodeURIComponent(version)}`;
    dialogTitle.textContent = `runner ${shownRunner}`;
    dialogImage.alt = `screen of runner ${shownRunner}`;
    dialogOpen.href = url;
    dialogStatus.textContent = button.dataset.version ? "" : "No screenshot yet: take a fresh one.";
    setImage(button.dataset.version ? url : "");
    dialog.showModal();
  }

  async function takeFresh() {
    if (shownRunner === null) return;
    dialogStatus.textContent = "Taking a screenshot…";
    nowButton.disabled = true;
    try {
      const response = await fetch(`/runner/${encodeURIComponent(shownRunner)}/screenshot/now`, { cache: "no-store" });
      if (!response.ok) {
        let message = `HTTP ${response.status}`;
        try { message = (await response.json()).error || message; } catch (_) { /* not JSON */ }
        dialogStatus.textContent = `No screenshot: ${message}`;
        return;
      }
      setImage(URL.createObjectURL(await response.blob()));
      dialogStatus.textContent = `Taken at ${clock(new Date())}.`;
    } catch (error) {
      dialogStatus.textContent = `No screenshot: ${error.message}`;
    } finally {
      nowButton.disabled = false;
    }
  }

  live.addEventListener("click", (event) => {
    const button = event.target.closest("button.shot");
    if (button) openScreenshot(button);
  });
  nowButton.addEventListener("click", takeFresh);
  document.getElementById("screenshot-close").addEventListener("click", () => dialog.close());
  dialog.addEventListener("click", (event) => {
    if (event.target === dialog) dialog.close(); // a click on the backdrop
  });
  dialog.addEventListener("close", () => { shownRunner = null; setImage(""); });
})();
