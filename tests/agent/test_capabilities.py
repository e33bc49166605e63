"""Device capabilities: runtimes, CPU flags and memory of this device, and an agent that loads no compression.

Parsing `/proc/cpuinfo` into flag names is `protocol.capabilities` (tests/protocol/test_capabilities.py).
"""

from __future__ import annotations

import subprocess
import sys

from agent.capabilities import device_capabilities
from agent.runtime import default_catalog


def test_capabilities_of_this_device() -> None:
    caps = device_capabilities(default_catalog())
    assert "onnxruntime" in caps.runtimes  # bare names: what the coordinator's variant policy matches
    assert all("-" not in r for r in caps.runtimes)
    assert caps.arch and caps.os and (caps.memory_mb or 0) > 0
    assert caps.cpu_features == sorted(caps.cpu_features)


def test_an_agent_only_install_never_loads_compression_cloud_or_torch() -> None:
    script = (
        "import importlib, pkgutil, sys, agent\n"
        "for module in pkgutil.walk_packages(agent.__path__, 'agent.'):\n"
        "    importlib.import_module(module.name)\n"
        "from agent.capabilities import device_capabilities\n"
        "from agent.runtime import default_catalog\n"
        "device_capabilities(default_catalog())\n"
        "forbidden = {'compression', 'cloud', 'simulators', 'torch'}\n"
        "print(','.join(sorted({m.partition('.')[0] for m in sys.modules} & forbidden)))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == ""
