"""Several nodes behind one balancer: what identifies a node's sessions and
request states to every other node, and the state they share in Redis."""
