"""The device node: the `Node` API (one trio nursery per node), the shells that carry out the
delivery machines' actions (`outbound`, `inbound`), the relay client, session and message
storage, discovery, events, and the control operations served to the CLI.

May import: `node.protocol`, `node.net`, the shared modules (`node.errors`, `node.clock`,
`node.files`, `node.rpc`, `node.config_file`); never `node.relay` or
`node.cli`. tests/test_layers.py enforces it.
"""
