% # The queue page (GET / of the queue's port). Every URL is relative: behind nginx it lives
% # at /queue/. The live part is the fragment (queue_fragment.tpl), polled by static/queue.js.
<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>queue</title>
<link rel="stylesheet" href="static/style.css">
<link rel="stylesheet" href="static/queue.css">
<link rel="icon" href="data:,">
</head>
<body>
<header class="top">
<h1>queue <small>first come, first served, across the fleet</small></h1>
<div id="notice" class="notice" role="status" hidden></div>
<p class="muted"><a href="queue.json">as JSON</a> · <a href="dashboard.txt">as text</a> · <a href="metrics">metrics</a></p>
</header>
<main id="live" data-etag="{{etag}}">
{{!fragment}}
</main>
<noscript><p class="notice stale">Without JavaScript this page does not update; reload it to see changes.</p></noscript>
<script src="static/live.js" defer></script>
<script src="static/queue.js" defer></script>
</body>
</html>
