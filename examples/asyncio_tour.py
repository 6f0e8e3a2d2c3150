"""Every awaitable method once: a server on a free port of 127.0.0.1 and one client, in one
event loop. ``python examples/asyncio_tour.py`` prints what each returns."""

from __future__ import annotations

import asyncio

from udpchat import ChatClientUdp, ChatServerUdp, Event, Message


def show(ev: Event | None) -> str:
    return "None" if ev is None else f"{ev.kind} {ev.reason} {ev.addr}"


async def main() -> None:
    async with ChatServerUdp(ip="127.0.0.1", port=0) as server:  # start(); stop() on the way out
        address: tuple[str, int] | None = server.address
        assert address is not None  # running
        async with ChatClientUdp(*address) as client:
            await client.asend("hello")  # never blocks the loop
            msg: Message | None = await client.arecv(timeout=1.0)  # None on timeout
            print("arecv:", None if msg is None else f"{msg.sender} {msg.text}")
            await client.asend("one")
            await client.asend("two")
            await asyncio.sleep(0.1)  # both relayed back by now, on loopback
            more: list[Message] = await client.arecv_many(max=1024, timeout=1.0)  # [] on timeout
            print("arecv_many:", [m.text for m in more])
            ev: Event | None = await server.anext_event(timeout=1.0)  # None on timeout
            print("anext_event:", show(ev))
        # The client has left (`quit`): the server's next event says so.
        events: list[Event] = await server.aevents(max=1024, timeout=1.0)  # [] on timeout
        print("aevents:", [show(e) for e in events])


if __name__ == "__main__":
    asyncio.run(main())
