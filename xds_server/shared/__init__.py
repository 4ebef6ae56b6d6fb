"""State shared by the replicas of one control plane (Redis), sealed with the operator's key."""
