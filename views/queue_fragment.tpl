% # The queue page's live part: served alone at queue.html (polled with an ETag), included
% # by queue.tpl. Nothing here depends on the time of the request (see views.QueuePage); the
% # page's script counts the waiting times up from data-since.
% from monitor.queue.views import clock, epoch
<section class="summary-line" aria-label="queue summary">
<ul class="summary">
% for profile, count, wanted in page.lengths:
<li class="length" data-profile="{{profile}}">{{profile}}: <b>{{count}}</b> waiting for <b>{{wanted}}</b> runners</li>
% end
% if not page.lengths:
<li>no profiles known yet</li>
% end
% for name, count in page.outcomes:
<li class="outcome" data-outcome="{{name}}">{{name}} <b>{{count}}</b></li>
% end
</ul>
% if page.no_fresh_member:
<p class="notice error" role="alert"><b>fault:</b> no member's data is fresh: nothing can be served or enqueued until one answers.</p>
% end
% for m in page.members:
% if not m.fresh:
<p class="notice stale" role="alert"><b>stale:</b> {{m.url}} did not answer{{(' (' + m.error + ')') if m.error else ''}}; {{('its counts are from ' + clock(m.stale_since)) if m.stale_since else 'it has never answered'}}. It is skipped until it answers.</p>
% end
% end
</section>
<section class="entries">
<h2>waiting, in serving order</h2>
<div class="table-wrap">
<table class="entries">
<thead><tr><th scope="col">#</th><th scope="col">unique id</th><th scope="col">profile</th><th scope="col">runners</th><th scope="col">run</th><th scope="col">waiting</th><th scope="col">state</th></tr></thead>
<tbody>
% for e in page.entries:
<tr class="entry {{e.state}}" data-unique-id="{{e.unique_id}}" data-position="{{e.position}}" data-state="{{e.state}}" data-profile="{{e.profile}}">
<th scope="row" class="position" data-label="#">{{e.position}}</th>
<td class="unique-id" data-label="unique id">{{e.unique_id}}</td>
<td class="profile" data-label="profile">{{e.profile}}</td>
<td class="count" data-label="runners">{{e.count}}{{(' (' + str(e.reserved) + ' reserved)') if e.reserved else ''}}</td>
<td class="run" data-label="run">
% if e.run_url:
<a class="run-link" href="{{e.run_url}}" target="_blank" rel="noopener noreferrer">{{e.qualified_repo}} #{{e.run_id}}</a>
% else:
{{e.qualified_repo}} #{{e.run_id}}
% end
</td>
<td class="waiting" data-label="waiting"><time datetime="{{e.enqueued_at.isoformat()}}" class="age" data-since="{{epoch(e.enqueued_at)}}">since {{clock(e.enqueued_at)}}</time></td>
<td class="state" data-label="state"><span class="state {{e.state}}">{{e.state}}</span>
% if e.priority:
<span class="chip priority">priority {{e.priority}}</span>
% end
% for url, ids in e.reserved_on:
<br><small>{{url}}: {{', '.join(str(i) for i in ids)}}</small>
% end
% if e.silent_since:
<br><small class="silent">client silent for <span class="age" data-since="{{epoch(e.silent_since)}}">a while</span></small>
% end
</td>
</tr>
% end
% if not page.entries:
<tr class="empty"><td colspan="7" class="muted">nobody is waiting</td></tr>
% end
</tbody>
</table>
</div>
</section>
<section class="members">
<h2>members</h2>
<div class="table-wrap">
<table class="members">
<thead><tr><th scope="col">member</th><th scope="col">data</th><th scope="col">profile</th><th scope="col">idle</th><th scope="col">healthy</th><th scope="col">target</th></tr></thead>
<tbody>
% for m in page.members:
% rows = m.profiles or (('', None, None, None),)
% for index, (profile, idle, healthy, target) in enumerate(rows):
<tr class="member {{'fresh' if m.fresh else 'stale'}}" data-member="{{m.url}}" data-profile="{{profile}}">
% if index == 0:
<th scope="row" rowspan="{{len(rows)}}" class="url">{{m.url}}</th>
<td rowspan="{{len(rows)}}" class="freshness"><span class="freshness {{'fresh' if m.fresh else 'stale'}}">{{'● fresh' if m.fresh else '! stale'}}</span></td>
% end
% if idle is None:
<td colspan="4" class="muted">no counts yet</td>
% else:
<td class="profile">{{profile}}</td><td class="idle">{{idle}}</td><td class="healthy">{{healthy}}</td><td class="target">{{target}}</td>
% end
</tr>
% end
% end
% if not page.members:
<tr><td colspan="6" class="muted">no members configured</td></tr>
% end
</tbody>
</table>
</div>
</section>
<section class="recent">
<h2>latest assignments</h2>
<p class="muted">wait: from enqueue to every runner reserved.</p>
<div class="table-wrap">
<table class="recent">
<thead><tr><th scope="col">enqueued</th><th scope="col">unique id</th><th scope="col">profile</th><th scope="col">runners</th><th scope="col">run</th><th scope="col">outcome</th><th scope="col">wait</th><th scope="col">on</th></tr></thead>
<tbody>
% for r in page.recent:
<tr class="assignment {{r.state}}" data-unique-id="{{r.unique_id}}" data-state="{{r.state}}">
<td><time datetime="{{r.enqueued_at.isoformat()}}">{{clock(r.enqueued_at)}}</time></td>
<td class="unique-id">{{r.unique_id}}</td>
<td>{{r.profile}}</td>
<td>{{r.count}}</td>
<td>
% if r.run_url:
<a class="run-link" href="{{r.run_url}}" target="_blank" rel="noopener noreferrer">{{r.qualified_repo}} #{{r.run_id}}</a>
% else:
{{r.qualified_repo}} #{{r.run_id}}
% end
</td>
<td class="outcome"><span class="state {{r.state}}">{{r.state}}</span></td>
<td class="wait">{{r.wait}}</td>
<td class="on">{{', '.join(r.members) or '—'}}</td>
</tr>
% end
% if not page.recent:
<tr><td colspan="8" class="muted">nothing served yet</td></tr>
% end
</tbody>
</table>
</div>
</section>
