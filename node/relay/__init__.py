"""The relay service that operators run: store-and-forward mailboxes (`server`, `store`,
PROTOCOL.md section 21), circuit relay v2 HOP and the DHT server (through `node.net`), its
config, JSON logs and Prometheus metrics, and the service that ties them together (`service`).

May import: `node.protocol`, `node.net`, the shared modules (`node.errors`, `node.clock`,
`node.files`, `node.rpc`, `node.config_file`). Never `node.device`: operators
run a relay without the device stack. tests/test_layers.py enforces it.
"""
