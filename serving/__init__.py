"""Beyond one machine: Ray Serve online serving and Ray Data batch restoration."""
