% rebase('base', title='monitor')
<header class="top">
<h1>monitor <small>{{config.github_api_suffix}} · {{config.github_api_scope}}</small></h1>
<div id="notice" class="notice" role="status" hidden></div>
</header>
<main id="live" data-etag="{{etag}}">
{{!fragment}}
</main>
<dialog id="screenshot" aria-labelledby="screenshot-title">
<h2 id="screenshot-title">screenshot</h2>
<img id="screenshot-image" alt="">
<p class="actions">
<button type="button" id="screenshot-now">take a fresh one</button>
<a id="screenshot-open" href="#" target="_blank" rel="noopener">open full size</a>
<button type="button" id="screenshot-close">close</button>
</p>
<p id="screenshot-status" role="status"></p>
</dialog>
<noscript><p class="notice stale">Without JavaScript this page does not update; reload it to see changes.</p></noscript>
<script src="/static/live.js" defer></script>
<script src="/static/dashboard.js" defer></script>
