"""fl_lib over Flower: the same server, strategies and client training, across Flower's transport.

`client_app.app` and `server_app.app` are the Flower app components; `records` is what crosses
the wire; `deployment` starts a SuperLink and SuperNodes on this machine (`fl_lib.bin.flower_train`).
"""
