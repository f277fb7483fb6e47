// The smallest program on the C++ API: load an artifact, ask one question about an image, print the answer
// as it is decoded and then what the detector found.
//   vle-simple ARTIFACT IMAGE "Please detect the person."
#include <cstdio>
#include <string_view>

#include <visionllm_edge/pipeline.h>

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: %s ARTIFACT IMAGE PROMPT\n", argv[0]);
    return 2;
  }
  try {
    vle::LoadOptions options;
    options.threads = 2;
    vle::Pipeline pipe = vle::Pipeline::load(argv[1], options);
    vle::Image image = vle::Image::load(argv[2]);
    vle::Result result = pipe.run(image, argv[3], {}, [](std::string_view piece) {
      std::fwrite(piece.data(), 1, piece.size(), stdout);  // the answer, streamed
    });
    std::printf("\n");
    for (const vle::Detection& d : result.detections) {
      std::printf("%s %.3f [%.1f, %.1f, %.1f, %.1f]\n", d.label.c_str(), d.score, d.box_xyxy[0], d.box_xyxy[1],
                  d.box_xyxy[2], d.box_xyxy[3]);
    }
  } catch (const vle::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
