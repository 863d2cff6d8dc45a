% # The dashboard's live part: served alone at /dashboard.html, included by index.tpl.
% if observation is not None and observation.override is not None:
<h2>current policy override</h2>
<pre>{{observation.override.to_json()}}</pre>
% end
% for view in profiles:
<section class="profile">
% c = view.counts
<h2>{{c.healthy if c else 0}}/{{c.target if c else '?'}} runners for {{view.key}}</h2>
% if c:
<p class="counts">idle {{c.idle}} · reserved {{c.reserved}} · busy {{c.busy}} · starting {{c.started_or_crashed}} · done {{c.done_or_unregistered}} · wanted {{c.wanted}} · excess {{c.excess_healthy}}</p>
% end
<table>
<thead><tr><th>id</th><th>guest</th><th>status</th><th>age</th><th>reserved for</th><th>labels</th></tr></thead>
<tbody>
% for row in view.runners:
<tr class="{{row.css}}" data-runner-id="{{row.id}}">
<td>{{row.id}}</td><td>{{row.guest_name or '–'}}</td>
<td><span class="status {{row.css}}">{{row.status}}{{' …' if row.in_flight else ''}}</span></td>
<td>{{row.age}}</td><td>{{row.reserved_for}}</td>
<td>
% for label in row.labels:
<span class="label">{{label}}</span>
% end
</td>
</tr>
% end
% if not view.runners:
<tr><td colspan="6" class="empty">no runners</td></tr>
% end
</tbody>
</table>
</section>
% end
% if observation is not None and observation.ignored:
<section>
<h2>in our namespace, not ours (left alone)</h2>
<ul>
% for item in observation.ignored:
<li>{{item}}</li>
% end
</ul>
</section>
% end
