import time, asyncio
async def test_timing(cluster, operator_running):
    t0 = time.monotonic()
    async with operator_running():
        t1 = time.monotonic(); print("start", t1 - t0)
        await cluster.create_isvc("chat", {"model": {"source": {"bundled": "x"}}})
        await cluster.wait_for(lambda: len(cluster.children()) == 13)
        t2 = time.monotonic(); print("children", t2 - t1)
    print("stop", time.monotonic() - t2)
