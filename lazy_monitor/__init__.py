"""lazy_monitor: is your network still in the lazy (NTK) regime?"""
