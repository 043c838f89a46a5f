import lazy_monitor


def test_package_imports():
    assert lazy_monitor.__doc__
