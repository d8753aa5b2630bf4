"""The node's network endpoint: one UDP socket shared by the DHT and (later) QUIC."""
