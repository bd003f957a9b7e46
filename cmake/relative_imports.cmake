# cmake -DSRC=<protoc output dir> -DDST=<package dir> -DSTEM=<proto stem> -DMODULE=<proto package, dotted> -P relative_imports.cmake
# Copies protoc's Python stubs into DST, turning `from <MODULE> import <STEM>_pb2` into a
# package-relative import, and writes the package's __init__.py.
foreach(name ${STEM}_pb2.py ${STEM}_pb2.pyi ${STEM}_pb2_grpc.py)
  file(READ ${SRC}/${name} text)
  string(REPLACE "from ${MODULE} import ${STEM}_pb2" "from . import ${STEM}_pb2" text "${text}")
  file(WRITE ${DST}/${name} "${text}")
endforeach()
file(WRITE ${DST}/__init__.py "\"\"\"Generated from the .proto at build time (CMake); not in git.\"\"\"\n")
