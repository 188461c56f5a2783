"""Install qwen3_scratch. Metadata lives in settings.ini (nbdev 2); this file must not import pkg_resources."""
from configparser import ConfigParser
from pathlib import Path

import setuptools

cfg = ConfigParser(delimiters=["="])
cfg.read(Path(__file__).parent / "settings.ini", encoding="utf-8")
c = cfg["DEFAULT"]

# torch is not pinned here: install the build for your machine first (README), and any torch>=2.6 satisfies this.
requirements = ["torch>=2.6"] + c.get("requirements", "").split()
dev_requirements = c.get("dev_requirements", "").split()

setuptools.setup(
    name=c["lib_name"],
    version=c["version"],
    description=c["description"],
    long_description=(Path(__file__).parent / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    author=c["author"],
    license="Apache-2.0",
    url=c["git_url"],
    project_urls={"Source": c["git_url"]},
    keywords=c["keywords"].split(),
    author_email=c["author_email"],
    entry_points={},
    scripts=[],
    packages=setuptools.find_packages(include=["qwen3_scratch", "qwen3_scratch.*"]),
    package_data={"qwen3_scratch": ["configs/**/*.yaml"]},
    include_package_data=True,
    python_requires=f">={c['min_python']}",
    install_requires=requirements,
    extras_require={"dev": dev_requirements},
    zip_safe=False,
    classifiers=["Programming Language :: Python :: 3", "License :: OSI Approved :: Apache Software License"],
)
