"""Traffic capture for sidecars: the NAT rules that send a pod's TCP connections to its Envoy
(`xds-server iptables`, what an injected init container runs)."""
