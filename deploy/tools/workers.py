"""What both deployment checkers know of sigrun's workers: the six stages, and which of them a
worker's arguments consume (`worker --all-stages`, or each `--stage S`)."""

STAGES = ["snapshot", "image-create", "gallery-publish", "replicate", "pool-create", "verify"]


def consumed_stages(args):
    """The stages a worker's arguments consume: every one with `--all-stages`, else each `--stage S`."""
    if "--all-stages" in args:
        return list(STAGES)
    return [args[i + 1] for i, arg in enumerate(args[:-1]) if arg == "--stage"]
