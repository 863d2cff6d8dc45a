% rebase('base', title='monitor', refresh=2)
<header>
<h1>monitor <small>{{config.github_api_suffix}} · {{config.github_api_scope}}</small></h1>
% if github_error:
<p class="notice error">GitHub: {{github_error}}</p>
% end
% if observation is not None and observation.error:
<p class="notice error">libvirt: {{observation.error}}</p>
% end
% if observation is None:
<p class="notice stale">Waiting for the first look at GitHub and libvirt…</p>
% end
</header>
<main>
% include('fragment', observation=observation, profiles=profiles)
<section>
<h2>recent events</h2>
<table class="events">
% for event in events:
<tr><td>{{event.at.strftime('%H:%M:%S')}}</td><td>{{event.kind}}</td><td>{{event.runner_id if event.runner_id is not None else ''}}</td><td>{{event.message}}</td></tr>
% end
</table>
</section>
</main>
