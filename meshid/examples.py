"""The example greeter's messages and stubs, for clients and servers of your own.

``examples/greeter/`` (and ``make demo``) speak ``meshid.examples.v1.Greeter``, defined in
``protos/meshid/examples/v1/greeter.proto``. Its generated modules live with meshid's other
generated code (``make proto`` writes them, and a test fails when they are stale); this is
their public home::

    from meshid.examples import greeter_pb2, greeter_pb2_grpc

    reply = greeter_pb2_grpc.GreeterStub(channel).SayHello(greeter_pb2.HelloRequest(name="me"))
"""

from __future__ import annotations

from meshid._proto import greeter_pb2, greeter_pb2_grpc

__all__ = ["greeter_pb2", "greeter_pb2_grpc"]
