// The queue page's live part (static/live.js): its fragment is queue.html, relative, since
// behind nginx the page is at /queue/.
"use strict";

window.startLivePage({ fragment: "queue.html", who: "queue", busy: "cannot read its store" });
