"""Values the tests and the benchmarks share: tokens, paths, guest and node XML."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
FIXTURES = ROOT / "tests" / "fixtures"

# The tokens write_config puts in .env.
API_TOKEN = "test-api-token"
GITHUB_TOKEN = "test-gh-token"
AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
JSON = "application/json"
REPO = "test/servo"  # write_config allows the prefix "test/"

TEST_GUEST_XML = """\
<domain type='test'>
  <name>{profile}.init</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='/dev/null'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <interface type='network'><source network='default'/><model type='virtio'/></interface>
    <graphics type='vnc' autoport='yes'/>
  </devices>
</domain>
"""


# A private libvirt test-driver node: the network and storage pool the test guests use.
NODE_XML = """\
<node>
  <network>
    <name>default</name>
    <bridge name='virbr0'/>
    <forward/>
    <ip address='192.168.122.1' netmask='255.255.255.0'>
      <dhcp><range start='192.168.122.2' end='192.168.122.254'/></dhcp>
    </ip>
  </network>
  <pool type='dir'>
    <name>default-pool</name>
    <target><path>/default-pool</path></target>
  </pool>
</node>
"""
NODE_POOL = "default-pool"  # the storage pool in NODE_XML
