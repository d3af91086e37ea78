"""The run's traffic, read from the components at its end: the MemoryX servers' counters
summed, the bytes of each SwarmX link, and each compute node's (the report's ``traffic``)."""

from __future__ import annotations

from emulator.launch import Cluster
from emulator.shards import MemoryXServers, summed_traffic
from proto.clients import NodeClient, SwarmXClient


def cluster_traffic(memoryx: MemoryXServers, cluster: Cluster) -> dict:
    """Every component's counters as the report's ``traffic`` section."""
    per_server = memoryx.stats_per_server()
    stats = summed_traffic(per_server)
    links = []
    for address in cluster.swarmx_addresses.values():
        s = SwarmXClient(address, cluster.security).stats()
        links += [{"link": d.link, "payload_bytes": d.payload_bytes} for d in s.down]
        links.append({"link": s.up.link, "payload_bytes": s.up.payload_bytes})
    nodes = [NodeClient(a, cluster.security).stats() for a in cluster.node_addresses]
    return {
        "memoryx_total_egress_bytes": stats.egress_bytes,
        "memoryx_total_ingress_bytes": stats.ingress_bytes,
        "num_updates": stats.num_updates,
        "num_duplicate_gradients": stats.num_duplicate_gradients,
        # Summed over the MemoryX servers (each server's own peak).
        "memoryx_state_bytes": stats.state_bytes,
        "memoryx_state_bytes_per_server": [s.state_bytes for s in per_server],
        "memoryx_peak_resident_bytes": stats.peak_resident_bytes,
        "memoryx_disk_read_bytes": stats.disk_read_bytes,
        "memoryx_disk_written_bytes": stats.disk_written_bytes,
        "memoryx_process_peak_rss_bytes": stats.process_peak_rss_bytes,
        "links": links,
        "nodes": [
            {
                "rank": n.rank,
                "weight_bytes_received": n.weight_bytes_received,
                "gradient_bytes_sent": n.gradient_bytes_sent,
                # The modelled node's (each layer's input): the emulated memory fit's.
                "peak_activation_bytes": n.peak_layer_input_bytes,
                "weight_bytes_held": n.weight_bytes_held,
                "backend": dict(n.backend_stats),
            }
            for n in nodes
        ],
    }


__all__ = ["cluster_traffic"]
