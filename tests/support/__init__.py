"""The shared harness of the tests and the benchmarks, one definition of each thing:

- `constants`: tokens, paths and XML every test and benchmark agrees on
- `configs`: config files written for a test (write_config and its variants)
- `waiting`: `wait_until`, the one way to poll for a condition
- `clock`: a clock a test moves by hand
- `monitor_thread`: the test thread playing the monitor thread (settle, step)
- `rigs`: an in-process monitor and web app driven through WebTest
- `served`: a running monitor served over real sockets, and stdlib HTTP clients for it
- `daemons`: `python -m monitor` and the GitHub stand-in as processes of their own
- `libvirtd`: names and helpers for the real libvirtd the e2e tests share
- `fleet`: a stand-in and N `monitor run` processes on loopback, for the global queue
- `vms`: the real-VM rig (`monitor run` on the libvirt bridge with tiny guests)
- `under_pytest`: the parts that need pytest (skips, fixture factories)

Only `under_pytest` imports pytest: benchmarks run without pytest installed.
"""
