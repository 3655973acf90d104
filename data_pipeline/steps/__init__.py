"""kfm's datatrove pipeline steps, one per module (datatrove is imported only by these modules)."""
