"""launchd plist templates; shipped as data of pacsd_installer, which fills them in."""
