"""Git push, read from the push itself: what a held `git-receive-pack` would do.

No sockets and no asyncio in the protocol parts. `pktline` frames, `advert` reads a ref
advertisement, `packscan` finds where a pack ends, `receive` is the receive-pack request
machine (commands, capabilities, push options, pack; held bytes and their SHA-256),
`report` builds git's own refusal, `describe` says what the push does (dulwich, from the
pack and a store of the target's objects), `fetch` is the I/O-free upload-pack request and
response that fills that store, and `fetchio` the one async function that runs it over a
byte channel.

Protocol v2 has no push: git sends GIT_PROTOCOL=version=2 to receive-pack too, which
ignores it and answers in v0 (v1 when asked for version=1); any v2 packet here is opaque.
A signed push (push-cert) is opaque too: it is not read.
"""
