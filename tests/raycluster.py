"""A Ray cluster of several nodes on this machine (``ray.cluster_utils.Cluster``: a raylet and
an object store per node, each with its own resources), in a process of its own so that the
test session's Ray is not touched, and under its own temporary directory (``RAY_TMPDIR``) so
that no other Ray on the machine takes it for the current cluster.

    python tests/raycluster.py CPUS [CPUS ...]

starts a head node of the first CPU count and a node for each further one, each node with
one ``triton`` resource (as docs/scale-out.md gives every node that serves Triton), prints the
cluster's address as its first line, then obeys lines on stdin: ``remove-node-of NAME``
removes a node (never the head) on which a live actor whose class name contains NAME runs, and
answers ``removed <node id>`` (``none`` where no such actor runs off the head); ``hold CPUS``
starts on every node an actor that holds CPUS of it (another job's work) and answers ``held``,
``release`` ends them (``released``); ``stop`` or the end of stdin shuts the cluster down.
"""
from __future__ import annotations

import sys


class Holder:
    def ready(self) -> bool:
        return True


def main(cpus: list[float]) -> None:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    from ray._private import state
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": cpus[0], "resources": {"triton": 1}})
    nodes = {node.node_id: node for node in (cluster.add_node(num_cpus=n, resources={"triton": 1}) for n in cpus[1:])}
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)  # to read the actors' nodes
    print(cluster.address, flush=True)
    holders = []
    try:
        for line in sys.stdin:
            command = line.split()
            if command[:1] == ["remove-node-of"]:
                hosts = [actor["Address"]["NodeID"] for actor in state.actors().values()
                         if actor.get("State") == "ALIVE" and command[1] in actor.get("ActorClassName", "")]
                node = next((node for node in hosts if node in nodes), None)
                if node is not None:
                    cluster.remove_node(nodes.pop(node))
                print(f"removed {node}" if node else "none", flush=True)
            elif command[:1] == ["hold"]:
                holders += [ray.remote(Holder).options(
                    num_cpus=float(command[1]),
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote()
                    for node in ray.nodes() if node["Alive"]]
                ray.get([actor.ready.remote() for actor in holders])
                print("held", flush=True)
            elif command[:1] == ["release"]:
                for actor in holders:
                    ray.kill(actor)
                holders.clear()
                print("released", flush=True)
            elif command[:1] == ["stop"]:
                break
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main([float(n) for n in sys.argv[1:]])
