"""``shareport demo``: the whole job on built-in material (``run``) and that material (``assets``)."""
