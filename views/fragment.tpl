% # The dashboard's live part: served alone at /dashboard.html (polled by the page, with an
% # ETag), included by index.tpl. Nothing here depends on the time of the request, so an
% # unchanged state renders to the same bytes; the page's script counts the ages up.
% import json
% from monitor.dashboard import clock, epoch, event_css
<section class="health" aria-label="monitor status">
<p class="facts">
% if health.observed_at is not None:
<span>last reconcile <time datetime="{{health.observed_at.isoformat()}}">{{clock(health.observed_at)}}</time> (<span class="age" data-since="{{epoch(health.observed_at)}}"></span> ago)</span>
% end
% if health.registrations_at is not None:
<span>GitHub's runner list fetched <time datetime="{{health.registrations_at.isoformat()}}">{{clock(health.registrations_at)}}</time></span>
% end
% rl = health.rate_limit
% if rl is not None:
<span class="rate-limit">GitHub API budget <b>{{rl.remaining}}</b>/{{rl.limit}}, resets {{clock(rl.reset_at)}}</span>
% else:
<span class="rate-limit">GitHub API budget: not known yet</span>
% end
</p>
% for notice in health.notices:
<p class="notice {{notice.kind}}" role="alert"><b>{{'fault' if notice.kind == 'error' else 'stale'}}:</b> {{notice.text}}</p>
% end
</section>
% if holds.maintenance or holds.paused:
<p class="notice hold" role="status"><b>on hold:</b>
% if holds.maintenance:
the host is in maintenance: every profile is drained (busy runners finish, nothing new is made).
% end
% if holds.paused:
the host is paused: nothing is created or rebuilt; runners that exist keep serving.
% end
</p>
% end
% if observation is not None and observation.override is not None:
% o = observation.override
<section class="override">
<h2>current policy override</h2>
<p>
% for key, count in sorted(o.profile_override_counts.items()):
<span class="chip">{{key}}: {{count}} (target {{o.profile_target_counts.get(key, '?')}})</span>
% end
</p>
<details id="override-json"><summary>as JSON</summary><pre>{{json.dumps(o.to_json(), indent=2)}}</pre></details>
</section>
% end
% for view in profiles:
% c = view.counts
<section class="profile" data-profile="{{view.key}}" aria-labelledby="profile-{{view.key}}">
<h2 id="profile-{{view.key}}">{{c.healthy if c else 0}}/{{c.target if c else "?"}} runners for {{view.key}}</h2>
<ul class="summary">
% if c:
<li class="idle">● idle <b>{{c.idle}}</b></li>
<li class="reserved">◆ reserved <b>{{c.reserved}}</b></li>
<li class="busy">▶ busy <b>{{c.busy}}</b></li>
<li class="starting">… starting <b>{{c.started_or_crashed}}</b></li>
<li>✕ done <b>{{c.done_or_unregistered}}</b></li>
<li>wanted <b>{{c.wanted}}</b></li>
% if c.excess_healthy:
<li>excess <b>{{c.excess_healthy}}</b></li>
% end
% else:
<li>not observed yet</li>
% end
<li>image age <b>{{view.image_age or 'unknown'}}</b></li>
% if view.rebuild:
<li class="rebuild{{' error' if view.rebuild.startswith('failed') else ''}}">image <b>{{view.rebuild}}</b>
% if view.rebuild.startswith('building'):
<a href="/profile/{{view.key}}/screenshot.png" target="_blank" rel="noopener">rebuild screen</a>
% end
</li>
% end
% if view.override_count is not None:
<li class="override">override <b>{{view.override_count}}</b></li>
% end
% if view.key in drained:
<li class="hold">⏸ <b>drained</b></li>
% end
</ul>
<div class="table-wrap">
<table class="runners">
<caption class="visually-hidden">runners of {{view.key}}</caption>
<thead><tr><th scope="col">screen</th><th scope="col">id</th><th scope="col">status</th><th scope="col">age</th><th scope="col">IPv4</th><th scope="col">reserved</th><th scope="col">labels</th></tr></thead>
<tbody>
% for row in view.runners:
<tr class="runner {{row.css}}" data-runner-id="{{row.id}}" data-status="{{row.status}}">
<td class="screen" data-label="screen">
% if row.screenshot_version:
<button type="button" class="shot" data-runner-id="{{row.id}}" data-version="{{row.screenshot_version}}" aria-label="screenshot of runner {{row.id}}"><img class="thumb" src="/runner/{{row.id}}/thumbnail.png?v={{row.screenshot_version}}" alt="screen of runner {{row.id}}" width="160" height="120" loading="lazy"></button>
% elif row.guest_name:
<button type="button" class="shot none" data-runner-id="{{row.id}}" aria-label="screenshot of runner {{row.id}}">no screenshot yet</button>
% else:
<span class="muted">no guest</span>
% end
% if row.boot_log:
<br><a class="boot-log" href="/runner/{{row.id}}/boot.log" target="_blank" rel="noopener" aria-label="boot log of runner {{row.id}}">boot log</a>
% end
</td>
<th scope="row" class="id" data-label="id">{{row.id}}<br><small class="guest">{{row.guest_name or 'no guest'}}</small></th>
<td class="status" data-label="status"><span class="status {{row.css}}">{{row.symbol}} {{row.status}}</span>{{' (changing)' if row.in_flight else ''}}</td>
<td class="age" data-label="age"><time datetime="{{row.created_at.isoformat()}}" class="age" data-since="{{epoch(row.created_at)}}">{{clock(row.created_at)}}</time></td>
<td class="ipv4" data-label="IPv4">{{row.ipv4 or '–'}}</td>
<td class="reserved" data-label="reserved">
% if row.reserved_for:
<span class="reserved-for" title="unique_id of the job">{{row.reserved_for}}</span>
% if row.reserved_since:
<br>for <span class="age" data-since="{{epoch(row.reserved_since)}}">{{clock(row.reserved_since)}}</span>
% end
% if row.reserved_by:
<br>by
% if row.reserved_by_url:
<a class="run-link" href="{{row.reserved_by_url}}" target="_blank" rel="noopener noreferrer">{{row.reserved_by}}</a>
% else:
{{row.reserved_by}}
% end
% end
% else:
–
% end
</td>
<td class="labels" data-label="labels">
% for chip in row.labels:
% if chip.key is None:
<span class="label key-only">{{chip.text}}</span>
% else:
<span class="label key-value"><span class="key">{{chip.key}}</span><span class="value">{{chip.value}}</span></span>
% end
% end
</td>
</tr>
% end
% if not view.runners:
<tr class="empty"><td colspan="7">no runners</td></tr>
% end
</tbody>
</table>
</div>
</section>
% end
% if observation is not None and observation.ignored:
<section class="ignored">
<h2>in our namespace, not ours (left alone)</h2>
<ul>
% for item in observation.ignored:
<li>{{item}}</li>
% end
</ul>
</section>
% end
<section class="history">
<h2>recent reservations</h2>
<p class="muted">waited: from the take to the job starting on its runner; ran: the job on the runner. <a href="/reservations">all, as JSON</a></p>
<div class="table-wrap">
<table class="history">
<thead><tr><th scope="col">asked</th><th scope="col">run</th><th scope="col">profile</th><th scope="col">runner</th><th scope="col">answer</th><th scope="col">waited</th><th scope="col">ran</th></tr></thead>
<tbody>
% for take in history:
<tr><td><time datetime="{{take['asked_at']}}">{{take['asked_at'][11:19]}}</time></td><td><a href="https://github.com/{{take['qualified_repo']}}/actions/runs/{{take['run_id']}}" rel="noopener">{{take['qualified_repo']}} #{{take['run_id']}}</a></td><td>{{take['profile']}}</td><td>{{take['runner_id'] if take['runner_id'] is not None else '—'}}</td><td>{{take['outcome']}}</td><td>{{seconds(take['waited_seconds'])}}</td><td>{{seconds(take['ran_seconds'])}}</td></tr>
% end
% if not history:
<tr><td colspan="7" class="muted">no takes yet</td></tr>
% end
</tbody>
</table>
</div>
</section>
<section class="events">
<h2>recent events</h2>
<div class="table-wrap">
<table class="events">
<thead><tr><th scope="col">time</th><th scope="col">what</th><th scope="col">runner</th><th scope="col">why</th></tr></thead>
<tbody>
% for event in events:
<tr class="{{event_css(event.kind)}}"><td><time datetime="{{event.at.isoformat()}}">{{clock(event.at)}}</time></td><td class="kind">{{event.kind}}</td><td>{{event.runner_id if event.runner_id is not None else ''}}{{(' ' + event.profile) if event.profile else ''}}</td><td class="message">{{event.message}}</td></tr>
% end
% if not events:
<tr><td colspan="4" class="muted">nothing yet</td></tr>
% end
</tbody>
</table>
</div>
</section>
