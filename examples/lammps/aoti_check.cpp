// Loads a .nequip.pt2 the way pair_nequip does (AOTIModelPackageLoader, metadata input/output order),
// runs it on inputs dumped from Python and prints the per-atom ltau_uncertainty.
#include <torch/torch.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <fstream>
#include <iostream>
#include <sstream>
int main(int argc, char **argv) {
  torch::inductor::AOTIModelPackageLoader loader(argv[1]);
  auto meta = loader.get_metadata();
  std::cout << "outputs: " << meta["nequip_aoti_outputs"] << "\n";
  std::ifstream spec(std::string(argv[2]) + "/spec.txt");
  std::vector<torch::Tensor> inputs;
  std::string line;
  while (std::getline(spec, line)) {
    std::istringstream iss(line);
    std::string key, dt; iss >> key >> dt;
    std::vector<int64_t> shape; int64_t s; while (iss >> s) shape.push_back(s);
    auto dtype = dt == "float64" ? torch::kFloat64 : torch::kInt64;
    auto t = torch::empty(shape, torch::TensorOptions().dtype(dtype));
    std::ifstream f(std::string(argv[2]) + "/" + key + ".bin", std::ios::binary);
    f.read((char *)t.data_ptr(), t.numel() * t.element_size());
    inputs.push_back(t);
  }
  auto outputs = loader.run(inputs);
  std::istringstream names(meta["nequip_aoti_outputs"]);
  std::string name; size_t i = 0;
  while (names >> name) {
    if (name == "ltau_uncertainty") {
      auto u = outputs[i].contiguous();
      auto a = u.accessor<double, 2>();  // what compute nequip/atom reads
      std::cout << "ltau_uncertainty " << u.sizes() << ":";
      for (int64_t j = 0; j < u.size(0); j++) std::cout << " " << a[j][0];
      std::cout << "\n";
    }
    i++;
  }
  return 0;
}
