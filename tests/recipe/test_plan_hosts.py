"""Node addresses chosen per node (issue 14 item 6) and GPU indices mapped onto Slurm's allocation."""

from __future__ import annotations

import pytest

from hpcserve.agent import hosts
from hpcserve.agent.gpus import visible_devices
from hpcserve.agent.procs import child_env
from hpcserve.errors import BackendError


def test_hostname_on_the_127_0_1_1_line_is_skipped_for_a_multi_node_job():
    # /etc/hosts "127.0.1.1 node7": the hostname resolves to loopback; the route to the head wins
    assert hosts.choose_address("10.1.2.7", "127.0.1.1", [], nodes=2) == "10.1.2.7"
    # no route known (no SLURM_LAUNCH_NODE_IPADDR): the first routable interface
    assert hosts.choose_address(None, "127.0.1.1", ["192.0.2.7"], nodes=2) == "192.0.2.7"


def test_multi_node_job_refuses_loopback_and_link_local_with_the_fix():
    for addr in ("127.0.1.1", "169.254.3.4"):
        with pytest.raises(BackendError, match=rf"node address {addr} .*loopback or link-local.*interface:NAME"):
            hosts.choose_address(None, addr, [], nodes=3)


def test_single_node_job_may_use_loopback():
    assert hosts.choose_address(None, "127.0.1.1", [], nodes=1) == "127.0.1.1"


def test_per_node_rules():
    setting = "gpu01=10.0.0.1, gpu02=interface:ib0, interface:eth0"
    assert hosts.node_rule(setting, {"gpu01"}) == "10.0.0.1"
    assert hosts.node_rule(setting, {"gpu02.cluster", "gpu02"}) == "interface:ib0"
    assert hosts.node_rule(setting, {"gpu03"}) == "interface:eth0"
    assert hosts.node_rule("auto", {"x"}) == "auto"
    assert hosts.node_rule("127.0.0.1", {"x"}) == "127.0.0.1"


def test_real_route_and_interface_lookups():
    assert hosts.route_address("127.0.0.1") == "127.0.0.1"
    assert hosts.interface_address("lo") == "127.0.0.1"
    assert hosts.interface_address("no-such-if0") is None
    # a literal IP is trusted, even loopback on many nodes (the local Slurm: every node is this host)
    assert hosts.resolve_address("127.0.0.1", nodes=10) == "127.0.0.1"
    with pytest.raises(BackendError, match="interface lo"):
        hosts.resolve_address("interface:lo", nodes=2)
    with pytest.raises(BackendError, match="interface 'no-such-if0' has no IPv4 address"):
        hosts.resolve_address("interface:no-such-if0", nodes=2)


def test_gpu_indices_follow_slurms_allocation_on_a_shared_node(monkeypatch):
    assert visible_devices("0,1", {}) == "0,1"
    assert visible_devices("0,1", {"CUDA_VISIBLE_DEVICES": "4,5,6,7"}) == "4,5"
    assert visible_devices("2,3", {"SLURM_STEP_GPUS": "1,3,5,7"}) == "5,7"
    with pytest.raises(BackendError, match=r"uses GPU 4 of this node but Slurm gave the step 4 "
                                           r"\(CUDA_VISIBLE_DEVICES=4,5,6,7\)"):
        visible_devices("4", {"CUDA_VISIBLE_DEVICES": "4,5,6,7"})
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "6,7")
    assert child_env({"A": "1"}, {"CUDA_VISIBLE_DEVICES": "1"})["CUDA_VISIBLE_DEVICES"] == "7"
    assert child_env({"A": "1"})["CUDA_VISIBLE_DEVICES"] == "6,7"   # not set by the plan: left alone


def test_job_size_comes_from_slurm_when_not_given(monkeypatch):
    monkeypatch.setenv("SLURM_NNODES", "2")
    with pytest.raises(BackendError, match="the other 1 node"):
        hosts.resolve_address("interface:lo")
    monkeypatch.setenv("SLURM_NNODES", "1")
    assert hosts.resolve_address("interface:lo") == "127.0.0.1"


def test_literal_loopback_on_nodes_that_are_different_hosts_is_refused(tmp_path):
    """The head collects the nodes' published addresses: 127.0.0.1 from two different hosts cannot work."""
    import asyncio
    import json

    (tmp_path / "hosts").mkdir()
    for rank, name in ((0, "gpu01"), (1, "gpu02")):
        (tmp_path / "hosts" / f"node-{rank}.json").write_text(json.dumps(
            {"rank": rank, "addr": "127.0.0.1", "epoch": hosts.epoch(), "hostname": name}))
    with pytest.raises(BackendError, match=r"loopback addresses but the nodes are different hosts "
                                           r"\(node 0 on gpu01, node 1 on gpu02\)"):
        asyncio.run(hosts.wait_addresses(tmp_path, {0, 1}, timeout=5))
    # the local Slurm: every node is this one host, loopback is fine
    (tmp_path / "hosts" / "node-1.json").write_text(json.dumps(
        {"rank": 1, "addr": "127.0.0.1", "epoch": hosts.epoch(), "hostname": "gpu01"}))
    assert asyncio.run(hosts.wait_addresses(tmp_path, {0, 1}, timeout=5)) == {0: "127.0.0.1", 1: "127.0.0.1"}
