// Preloaded into the Node peers (NODE_OPTIONS=--require bench/loopback.cjs) so that a
// server that calls listen(port) without a host (supergateway) binds 127.0.0.1 only,
// never every interface. A listen() that names a host is left alone.
'use strict';
const net = require('node:net');
const original = net.Server.prototype.listen;
net.Server.prototype.listen = function (...args) {
  const first = args[0];
  if (typeof first === 'number' || (typeof first === 'string' && /^\d+$/.test(first))) {
    if (args.length === 1 || typeof args[1] === 'function') {
      args.splice(1, 0, '127.0.0.1');
    }
  } else if (first && typeof first === 'object' && first.port !== undefined && !first.host && !first.path) {
    args[0] = { ...first, host: '127.0.0.1' };
  }
  return original.apply(this, args);
};
