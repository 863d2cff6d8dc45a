"""A stand-in for the slice of GitHub's REST API the monitor uses, served over real HTTP.

`GitHubStandIn` is a Bottle app on a waitress server thread. It keeps runners per scope
(`/repos/<owner>/<repo>` and `/orgs/<org>`), run artifacts per repository, and a primary
rate limit, and answers the way api.github.com does (shapes from GitHub's OpenAPI
description, `Link` pagination, `ETag`/304, `x-ratelimit-*` headers, JSON errors). Tests and
`monitor demo` drive it through Python methods or the equivalent `/_standin/...` HTTP
endpoints: change runner state, add and delete artifacts, inject faults, and let it play the
runner agent and the jobs. A real agent (the end-to-end tests' guests run one,
`tests/guest/agent.sh`) uses the `/_standin/agent/*` endpoints instead, identified by its JIT
config as GitHub knows a runner by its credentials. It is a test and demo peer: production
code never imports it, and it imports no other monitor module but `serving`.

    state.py     runners, artifacts, workflow runs, faults, the rate limit; the control API
    shapes.py    GitHub's JSON documents and the JIT config
    rest.py      the GitHub REST routes
    agents.py    real runner agents and the simulated agents and jobs
    control.py   the `/_standin/...` endpoints
    server.py    `GitHubStandIn`: all of it served from a background thread

Run it alone with `python -m monitor.standin --port 9000 [--token T] [--demo]
[--no-jit-permission]`.
"""

from monitor.standin.server import GitHubStandIn
from monitor.standin.state import AgentCall
from monitor.standin.state import RecordedRequest

__all__ = ["AgentCall", "GitHubStandIn", "RecordedRequest"]
