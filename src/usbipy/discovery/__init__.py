"""Finding usbipy servers on the network by DNS-SD over multicast DNS (RFC 6762,
RFC 6763), with python-zeroconf: what a server says of itself (:mod:`.records`),
the server's advertisement (:mod:`.advertise`), and browsing for servers
(:mod:`.browse`; the client remembers what it found: :mod:`usbipy.client.fleet`).

The service type is ``_usbip._tcp``. IANA's registry gives TCP port 3240 the
service name "triomotion" (Trio Motion Control Port), which USB/IP has used
since 2005 by custom; "usbip" is not registered. Advertising
"_triomotion._tcp" would tell every browser on the network that a motion
controller listens here, so the service is named for the protocol it speaks.
"""
