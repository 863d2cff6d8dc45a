"""monitor: keeps pools of ephemeral GitHub Actions runner VMs on libvirt."""

__version__ = "0.1.0"
