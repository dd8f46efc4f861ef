"""An event-sourced Socket.IO chat server.

A chat travels: sockets (handler) -> service (command) -> domain (decision)
-> writer/store (append, commit) -> projections -> protocol (emit built from
the stored event).
"""
