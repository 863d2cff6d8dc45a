% rebase('base', title=f'{status} error')
<main>
<h1>{{status}}</h1>
<p>{{message}}</p>
<p><a href="/">Back to the dashboard</a></p>
</main>
