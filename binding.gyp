{
  # CPU-only build through node-gyp, for machines without CMake. Same source list as CMakeLists.txt
  # (native/sources.json); the CUDA kernels need the CMake build.
  "targets": [
    {
      "target_name": "tcal",
      "sources": [
        "<!@(node -p \"const s=require('./native/sources.json'); [...s.core, ...s.cpu, ...s.napi].join(' ')\")"
      ],
      "include_dirs": ["<!(node -p \"require('node-addon-api').include_dir\")"],
      "defines": [
        "NAPI_VERSION=8",
        "NAPI_CPP_EXCEPTIONS",
        "NODE_ADDON_API_DISABLE_DEPRECATED",
        "TCAL_BUILD_SYSTEM=\"node-gyp\"",
        "TCAL_SOURCE_HASH=\"<!(node native/source-hash.js)\""
      ],
      "cflags!": ["-fno-exceptions"],
      "cflags_cc!": ["-fno-exceptions", "-fno-rtti"],
      "cflags_cc": ["-std=c++17", "-O3", "-fexceptions"]
    }
  ]
}
