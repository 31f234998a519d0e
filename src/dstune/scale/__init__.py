"""Scale-out: the memory and time planner (`dstune plan`), multi-process launches, and tensor-parallel inference."""
