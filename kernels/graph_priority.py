"""CUDA graphs that run at a stream priority (SPEC 2.5, 2.6).

Seen on an H100 (torch 2.11, CUDA 13 driver): a graph replayed on a high-priority stream ran its
kernels at the default priority. Twenty small kernels enqueued behind a long low-priority prefill
took 62 us eagerly on a high-priority stream, but 411 us as a graph replayed on the same stream,
no better than at equal priority (387 us): they waited for the prefill's CTAs to drain.

A PriorityGraph therefore gives every kernel node the priority itself
(CU_KERNEL_NODE_ATTRIBUTE_PRIORITY) and is instantiated with
CUDA_GRAPH_INSTANTIATE_FLAG_USE_NODE_PRIORITY; it launches on torch's current stream. torch
captures it (keep_graph=True: torch keeps the cudaGraph_t and its memory pool, and never
instantiates it), so captured code sees torch's usual graph rules.
"""

import weakref

import torch

from kernels.cuda_build import bindings, check


def capture(body, after_warm_up=None, *, keep_graph=False):
    """body() warmed up on a side stream (as torch.cuda.graph requires), after_warm_up() (e.g. undo
    the warm-up's state changes), then body() captured into a torch graph. keep_graph: torch keeps
    the cudaGraph_t uninstantiated, for PriorityGraph. The graph keeps body alive: its kernels use
    the tensors body's closure holds (workspaces made before capture, too) by address."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        body()
    torch.cuda.current_stream().wait_stream(side)
    if after_warm_up is not None:
        after_warm_up()
    graph = torch.cuda.CUDAGraph(keep_graph=keep_graph)
    with torch.cuda.graph(graph):
        body()
    graph.body = body
    return graph


def _destroy(driver, graph_exec):
    check(driver.cuGraphExecDestroy(graph_exec), "cuGraphExecDestroy")


class PriorityGraph:
    """A captured torch graph whose kernel nodes all run at `priority` (a stream priority: lower
    numbers run first, within torch.cuda.Stream.priority_range())."""

    def __init__(self, graph, priority):
        driver, _ = bindings()
        lowest, highest = torch.cuda.Stream.priority_range()
        if not highest <= priority <= lowest:
            raise ValueError(f"priority must lie in [{highest}, {lowest}] (lower runs first), got {priority}")
        self.graph = graph  # owns the cudaGraph_t and the memory its kernels use
        raw = driver.CUgraph(graph.raw_cuda_graph())
        _, count = check(driver.cuGraphGetNodes(raw, 0), "cuGraphGetNodes")
        nodes, _ = check(driver.cuGraphGetNodes(raw, count), "cuGraphGetNodes")
        value = driver.CUkernelNodeAttrValue()
        value.priority = priority
        self.kernel_nodes = 0
        for node in nodes:
            if check(driver.cuGraphNodeGetType(node), "cuGraphNodeGetType") == \
                    driver.CUgraphNodeType.CU_GRAPH_NODE_TYPE_KERNEL:
                check(driver.cuGraphKernelNodeSetAttribute(
                    node, driver.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PRIORITY, value),
                    "cuGraphKernelNodeSetAttribute")
                self.kernel_nodes += 1
        flags = driver.CUgraphInstantiate_flags.CUDA_GRAPH_INSTANTIATE_FLAG_USE_NODE_PRIORITY
        self.exec = check(driver.cuGraphInstantiate(raw, flags), "cuGraphInstantiate")
        self.priority = priority
        # destroyed with the object, or at exit while cuda-python is still loaded
        weakref.finalize(self, _destroy, driver, self.exec)

    def replay(self):
        driver, _ = bindings()
        stream = driver.CUstream(torch.cuda.current_stream().cuda_stream)
        check(driver.cuGraphLaunch(self.exec, stream), "cuGraphLaunch")
