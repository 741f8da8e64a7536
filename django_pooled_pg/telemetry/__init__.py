"""Fleet statistics above the pooling core: snapshots, the publisher, history, fleet view, status page data."""
