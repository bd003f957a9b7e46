# rerank_proto_stubs(<target> <proto file> <proto root> <install dir>)
#
# Generates the Python protobuf and gRPC stubs (and a descriptor set with the proto's
# comments, rerank.binpb) for one .proto into the build tree and installs them as the
# package directory <install dir> (e.g. rerank_server/_proto). protoc writes absolute
# imports (`from rerank.v1 import rerank_pb2`); they are made package-relative so that
# nothing generic (a top-level `rerank`) is put on sys.path or into site-packages.
function(rerank_proto_stubs target proto_file proto_root install_dir)
  find_package(Python3 REQUIRED COMPONENTS Interpreter)
  # googleapis-common-protos ships google/api/annotations.proto beside its Python modules.
  execute_process(
    COMMAND ${Python3_EXECUTABLE} -c "import google.api.annotations_pb2 as a, pathlib; print(pathlib.Path(a.__file__).parent.parent.parent)"
    OUTPUT_VARIABLE googleapis_include OUTPUT_STRIP_TRAILING_WHITESPACE COMMAND_ERROR_IS_FATAL ANY)
  execute_process(
    COMMAND ${Python3_EXECUTABLE} -c "import grpc_tools, pathlib; print(pathlib.Path(grpc_tools.__file__).parent / '_proto')"
    OUTPUT_VARIABLE protobuf_include OUTPUT_STRIP_TRAILING_WHITESPACE COMMAND_ERROR_IS_FATAL ANY)

  get_filename_component(stem ${proto_file} NAME_WE)
  file(RELATIVE_PATH rel ${proto_root} ${proto_file})
  get_filename_component(rel_dir ${rel} DIRECTORY)
  set(raw ${CMAKE_CURRENT_BINARY_DIR}/${target}-protoc)
  set(out ${CMAKE_CURRENT_BINARY_DIR}/${target})
  set(files ${out}/${stem}_pb2.py ${out}/${stem}_pb2.pyi ${out}/${stem}_pb2_grpc.py ${out}/rerank.binpb ${out}/__init__.py)
  string(REPLACE "/" "." module_path ${rel_dir})
  add_custom_command(
    OUTPUT ${files}
    COMMAND ${CMAKE_COMMAND} -E rm -rf ${raw} ${out}
    COMMAND ${CMAKE_COMMAND} -E make_directory ${raw} ${out}
    COMMAND ${Python3_EXECUTABLE} -m grpc_tools.protoc
            -I ${proto_root} -I ${googleapis_include} -I ${protobuf_include}
            --python_out=${raw} --pyi_out=${raw} --grpc_python_out=${raw}
            --include_source_info --descriptor_set_out=${out}/rerank.binpb
            ${proto_file}
    COMMAND ${CMAKE_COMMAND} -DSRC=${raw}/${rel_dir} -DDST=${out} -DSTEM=${stem} -DMODULE=${module_path}
            -P ${CMAKE_CURRENT_FUNCTION_LIST_DIR}/relative_imports.cmake
    DEPENDS ${proto_file} ${CMAKE_CURRENT_FUNCTION_LIST_DIR}/relative_imports.cmake
    COMMENT "protoc: ${rel} -> ${install_dir}"
    VERBATIM)
  add_custom_target(${target} ALL DEPENDS ${files})
  install(FILES ${files} DESTINATION ${install_dir})
endfunction()
