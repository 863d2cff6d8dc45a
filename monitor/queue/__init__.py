"""The global queue: Servo's workflows reserve runners across a fleet of monitors, first come
first served, with every entry kept in a store (SQLite, or PostgreSQL shared by several queue
processes) so nothing is lost on a restart.

Modules:
  contracts.py  the types and Protocols the parts meet at (pure, no I/O)
  policy.py     which waiting entry gets which members' idle runners (pure)
  store.py      entries, tokens, order and member counts in SQLite or PostgreSQL (Peewee)
  engine.py     `QueueEngine`: enqueue, poll, snapshot; its dispatcher thread polls members,
                plans, forwards takes, releases, expires
  members.py    the HTTP adapter to members (`dashboard.json`, take, release)
  web.py        upstream's queue API, over an engine
  views.py      what people and scrapers see, from a Snapshot (pure): upstream's dashboard.txt,
                the JSON, Prometheus text, the page's view-model
  pages.py      `install_view_routes`: the queue page and its live fragment, /queue.json,
                /metrics (views/queue*.tpl, static/queue.*)
  service.py    composition: the engine `[queue]` configures, served on its port on every
                `listen_on` address (`monitor run` with `[queue]`, or `monitor queue` alone)
"""
